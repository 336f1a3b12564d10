// Node-RED settings for running this example from its own directory:
//
//   npm ci && npm start          # http://127.0.0.1:1880/dashboard, the editor at http://127.0.0.1:1880/
//
// Everything that differs between machines comes from the environment:
//   SESSION_MONITOR_MQTT_URL   the broker the service publishes to (default mqtt://127.0.0.1:1883,
//                              the service's embedded broker); flow.json's broker node reads it
//   SESSION_MONITOR_API_URL    the service's HTTP address (default http://127.0.0.1:9842), for the
//                              history that seeds the chart; flow.json's "history request" reads it
//   NODE_RED_USER_DIR          Node-RED's user directory (default ./data); flow.json is copied
//                              there as flows.json when it has none yet
//   PORT                       the port of the editor and the dashboard (default 1880)
//   NODE_RED_HOST              the address they listen on (default 127.0.0.1)
const fs = require('fs')
const path = require('path')

process.env.SESSION_MONITOR_MQTT_URL ||= 'mqtt://127.0.0.1:1883'
process.env.SESSION_MONITOR_API_URL ||= 'http://127.0.0.1:9842'

const userDir = path.resolve(process.env.NODE_RED_USER_DIR || path.join(__dirname, 'data'))
fs.mkdirSync(userDir, { recursive: true })
const flowFile = path.join(userDir, 'flows.json')
if (!fs.existsSync(flowFile)) {
  fs.copyFileSync(path.join(__dirname, 'flow.json'), flowFile)
}

module.exports = {
  userDir,
  flowFile: 'flows.json',
  // No key to keep: the flow has no secrets (an MQTT password would be one; see README.md).
  credentialSecret: false,
  uiPort: Number(process.env.PORT || 1880),
  uiHost: process.env.NODE_RED_HOST || '127.0.0.1',
  flowFilePretty: true,
  // Nothing is fetched from the internet: no update check, no palette installs.
  diagnostics: { enabled: false },
  telemetry: { enabled: false, updateNotification: false },
  externalModules: { autoInstall: false, palette: { allowInstall: false } },
  editorTheme: {
    tours: false,
    projects: { enabled: false }
  },
  logging: {
    console: { level: 'info', metrics: false, audit: false }
  },
  functionGlobalContext: {}
}
