"""OCI image archives from a directory, with no container engine and no registry.

An archive holds one uncompressed layer made from a root file system directory, and is written
in OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`), named by the
`io.containerd.image.name` annotation, so that containerd's `ctr images import` (and so
`kube-cluster load`) registers it under that reference. The layer is reproducible: entries
sorted, owned by root, timestamps at 0.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"


def layer_tar(rootfs: Path, owners: dict[str, int] | None = None) -> bytes:
    """The directory as a tar layer: paths relative to it, sorted, mtime 0, owned by root
    except the paths in `owners` (path in the image without the leading slash -> uid = gid)."""
    owners = owners or {}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(rootfs.rglob("*"), key=lambda p: str(p.relative_to(rootfs))):
            name = str(path.relative_to(rootfs))
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = owners.get(name, 0)
            info.uname = info.gname = ""
            info.mtime = 0
            info.pax_headers = {}
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out.getvalue()


def config_json(
    diff_id: str,
    entrypoint: list[str],
    user: str,
    *,
    cmd: list[str] | None = None,
    env: list[str] | None = None,
    exposed_ports: list[str] | None = None,
    labels: dict[str, str] | None = None,
    working_dir: str | None = None,
) -> dict:
    """The image configuration (what `docker inspect` shows under Config)."""
    config: dict = {
        "User": user,
        "Entrypoint": entrypoint,
        "Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"],
    }
    if cmd:
        config["Cmd"] = cmd
    if exposed_ports:
        config["ExposedPorts"] = {port: {} for port in exposed_ports}
    if labels:
        config["Labels"] = labels
    if working_dir:
        config["WorkingDir"] = working_dir
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "image/oci.py"}],
    }


def write_archive(
    ref: str, rootfs: Path, out: Path, owners: dict[str, int] | None = None, **config
) -> dict:
    """Writes the OCI layout archive of `rootfs` named `ref` to `out`; returns sizes and the
    image configuration written."""
    layer = layer_tar(rootfs, owners)
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    image_config = config_json(layer_digest, **config)
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": [
                {"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": len(layer)}
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": MANIFEST_MEDIA_TYPE,
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": tag,
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    files = [
        ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'),
        ("index.json", index),
        ("blobs/sha256/" + layer_digest[7:], layer),
        ("blobs/sha256/" + config_digest[7:], config_bytes),
        ("blobs/sha256/" + manifest_digest[7:], manifest),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return {
        "layer_bytes": len(layer),
        "archive_bytes": out.stat().st_size,
        "config": image_config,
        "manifest_digest": manifest_digest,
    }


def copy_into(rootfs: Path, source: Path, target: str, mode: int | None = None) -> None:
    """Copies `source` to `rootfs/target` (absolute path in the image), making directories."""
    dest = rootfs / target.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(source.read_bytes())
    os.chmod(dest, mode if mode is not None else stat.S_IMODE(source.stat().st_mode))
