#!/usr/bin/env python3
"""Tests of the image tooling: image/build writes the image the Dockerfile describes, and
image/oci.py writes archives containerd can import (digests, sizes, names, reproducible).

    python3 image/test_image.py        # `cargo test` runs it (tests/tests/image.rs)

Needs no cargo build and no apt: the archive checks use a small root file system.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "image"))
import oci  # noqa: E402

TESTS = []


def test(function):
    TESTS.append(function)
    return function


def dockerfile_final_stage() -> dict:
    """ENTRYPOINT, USER, EXPOSE, LABELs and COPY of the Dockerfile's last stage."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [l for l in re.sub(r"\\\n\s*", " ", text).splitlines() if l and not l.startswith("#")]
    stage = lines[max(i for i, l in enumerate(lines) if l.startswith("FROM ")) :]
    found = {"labels": {}, "exposed_ports": [], "copies": []}
    for line in stage:
        word, _, rest = line.partition(" ")
        if word == "FROM":
            found["base"] = rest.strip()
        elif word == "ENTRYPOINT":
            found["entrypoint"] = json.loads(rest)
        elif word == "USER":
            found["user"] = rest.strip()
        elif word == "EXPOSE":
            found["exposed_ports"] += rest.split()
        elif word == "LABEL":
            found["labels"].update(dict(re.findall(r'(\S+)="([^"]*)"', rest)))
        elif word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            *sources, dest = parts
            found["copies"] += [dest.rstrip("/") + "/" + Path(s).name for s in sources]
    return found


def build_config() -> dict:
    out = subprocess.run(
        [sys.executable, str(ROOT / "image" / "build"), "--print-config"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


@test
def image_build_describes_the_dockerfiles_image():
    docker, built = dockerfile_final_stage(), build_config()
    assert docker["entrypoint"] == built["entrypoint"], (docker["entrypoint"], built["entrypoint"])
    assert docker["user"] == built["user"], (docker["user"], built["user"])
    assert docker["exposed_ports"] == built["exposed_ports"]
    assert docker["labels"] == built["labels"], (docker["labels"], built["labels"])
    assert sorted(docker["copies"]) == sorted(built["binaries"]), (docker["copies"], built["binaries"])
    # The working directory and the CA bundle variable come with the Dockerfile's base image.
    assert docker["base"] == "gcr.io/distroless/cc-debian12:nonroot", docker["base"]
    assert built["working_dir"] == "/home/nonroot"
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in built["env"]


@test
def the_chart_runs_the_binaries_where_the_image_has_them():
    built = build_config()
    deployment = (ROOT / "charts/session-monitor-operator/templates/deployment.yaml").read_text()
    assert "/usr/local/bin/session-monitor-operator" in built["binaries"]
    assert "/usr/local/bin/session-monitor-operator" in deployment


def sample_rootfs(directory: Path) -> Path:
    root = directory / "rootfs"
    (root / "usr/local/bin").mkdir(parents=True)
    binary = root / "usr/local/bin/tool"
    binary.write_bytes(b"#!/bin/sh\necho hi\n")
    binary.chmod(0o755)
    (root / "home/nonroot").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("nonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n")
    (root / "lib64").mkdir()
    (root / "lib64/ld.so").symlink_to("/lib/x86_64-linux-gnu/ld.so")
    return root


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@test
def an_archive_is_an_oci_layout_with_matching_digests():
    with tempfile.TemporaryDirectory() as scratch:
        root = sample_rootfs(Path(scratch))
        out = Path(scratch) / "image.tar"
        written = oci.write_archive(
            "k8s.local/tool:1", root, out, owners={"home/nonroot": 65532},
            entrypoint=["/usr/local/bin/tool"], user="65532:65532", exposed_ports=["80/tcp"],
        )
        files = members(out)
        assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(files["index.json"])
        [entry] = index["manifests"]
        assert entry["annotations"]["io.containerd.image.name"] == "k8s.local/tool:1"
        assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1"

        def blob(descriptor):
            data = files["blobs/sha256/" + descriptor["digest"][7:]]
            assert len(data) == descriptor["size"]
            assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
            return data

        manifest = json.loads(blob(entry))
        config = json.loads(blob(manifest["config"]))
        [layer_descriptor] = manifest["layers"]
        layer = blob(layer_descriptor)
        assert config["rootfs"]["diff_ids"] == [layer_descriptor["digest"]]
        assert config["config"]["Entrypoint"] == ["/usr/local/bin/tool"]
        assert config["config"]["User"] == "65532:65532"
        assert config["config"]["ExposedPorts"] == {"80/tcp": {}}
        assert written["config"] == config
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            entries = {m.name: m for m in tar.getmembers()}
        assert entries["usr/local/bin/tool"].mode & 0o777 == 0o755
        assert entries["usr/local/bin/tool"].uid == 0
        assert entries["home/nonroot"].uid == 65532 and entries["home/nonroot"].isdir()
        assert entries["lib64/ld.so"].issym()
        assert entries["lib64/ld.so"].linkname == "/lib/x86_64-linux-gnu/ld.so"
        assert all(m.mtime == 0 for m in entries.values())


@test
def archives_are_reproducible():
    with tempfile.TemporaryDirectory() as scratch:
        root = sample_rootfs(Path(scratch))
        a, b = Path(scratch) / "a.tar", Path(scratch) / "b.tar"
        for out in (a, b):
            oci.write_archive("k8s.local/tool:1", root, out, entrypoint=["/t"], user="1:1")
        assert members(a) == members(b)


def main() -> int:
    failed = 0
    for function in TESTS:
        try:
            function()
            print(f"ok   {function.__name__}")
        except Exception:  # noqa: BLE001 - report every failure
            failed += 1
            print(f"FAIL {function.__name__}\n{traceback.format_exc()}")
    print(f"{len(TESTS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
