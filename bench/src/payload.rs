//! The cost of the user list at 10,000 users: rendering every state payload from the registry
//! (as each publish does), its size, and the time from publish to delivery through mosquitto.

use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use session_monitor::config::{Topics, UserListFormat, defaults};
use session_monitor::exclusions::Exclusions;
use session_monitor::mqtt::render_state;
use session_monitor::registry::sharded::DEFAULT_SHARDS;
use session_monitor::registry::{DEFAULT_MAX_HOSTS, ExpiryPolicy, ShardedRegistry, UnixMillis};

use crate::procs::Mosquitto;
use crate::realistic;

pub struct Payload {
    pub users: usize,
    pub list_bytes: usize,
    pub render: Duration,
    /// Median of publish → delivered to a subscriber, QoS 1.
    pub delivery: Duration,
}

pub fn run(users: usize) -> Payload {
    let now = UnixMillis::now();
    // One session per user, so the list has exactly `users` names.
    let mut records = realistic::sessions(users * 2, now);
    records.sort_by(|a, b| (&a.user_directory, &a.user_id).cmp(&(&b.user_directory, &b.user_id)));
    records.dedup_by(|a, b| a.user_directory == b.user_directory && a.user_id == b.user_id);
    records.truncate(users);
    let registry = ShardedRegistry::new(
        ExpiryPolicy::default(),
        Exclusions::default(),
        DEFAULT_MAX_HOSTS,
        DEFAULT_SHARDS,
    );
    registry.restore(&records, now);
    assert_eq!(registry.active_users(), users);
    let topics = Topics {
        user_count: defaults::TOPIC_USER_COUNT.into(),
        user_list: defaults::TOPIC_USER_LIST.into(),
        host_prefix: defaults::TOPIC_HOST_PREFIX.into(),
        status: defaults::TOPIC_STATUS.into(),
        session_start: None,
        session_stop: None,
        connection_open: None,
        connection_close: None,
        peak_today: None,
    };
    let mut render = Duration::MAX;
    let mut messages = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        messages = render_state(&registry, &topics, UserListFormat::DirectoryAndId);
        render = render.min(start.elapsed());
    }
    let list = messages
        .iter()
        .find(|(topic, _)| topic == defaults::TOPIC_USER_LIST)
        .map(|(_, payload)| payload.clone())
        .expect("the user list");

    let broker = Mosquitto::start();
    let mut options = MqttOptions::new("bench-payload", "127.0.0.1", broker.port);
    options.set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024);
    let (client, mut connection) = Client::new(options, 10);
    client
        .subscribe(defaults::TOPIC_USER_LIST, QoS::AtLeastOnce)
        .expect("subscribe");
    let mut deliveries = Vec::new();
    let mut sent_at = None;
    let mut subscribed = false;
    for event in connection.iter() {
        match event.expect("MQTT link") {
            Event::Incoming(Packet::SubAck(_)) => subscribed = true,
            Event::Incoming(Packet::Publish(p)) => {
                assert_eq!(p.payload.len(), list.len());
                deliveries.push(sent_at.take().map(|t: Instant| t.elapsed()).expect("sent"));
                if deliveries.len() == 21 {
                    break;
                }
            }
            _ => {}
        }
        if subscribed && sent_at.is_none() {
            sent_at = Some(Instant::now());
            client
                .publish(
                    defaults::TOPIC_USER_LIST,
                    QoS::AtLeastOnce,
                    false,
                    list.clone(),
                )
                .expect("publish");
        }
    }
    deliveries.remove(0); // the first includes the subscription's warm-up
    deliveries.sort();
    Payload {
        users,
        list_bytes: list.len(),
        render,
        delivery: deliveries[deliveries.len() / 2],
    }
}
