"""Sharing data and models through a DVC remote, as a team does, against real servers on this machine.

A teammate clones the project (tiny params), runs `dvc repro`, commits (with the remote in
`.dvc/config`), pushes git to a bare repository and the DVC cache to the remote, then runs an
experiment and `dvc exp push`es it. A fresh
clone with no data then `dvc pull`s shards and `model/best`, finds `dvc repro` with nothing to do, and
`dvc exp pull`s the teammate's experiment. Two remotes: a local directory (a NAS or a shared disk)
and SSH: Debian's `openssh-server` started by the test on 127.0.0.1 with a key made for it, through
DVC's SSH plugin (dvc-ssh).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port
from test_pipeline_e2e import TINY, merge, run

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
EXPERIMENT = "teammate-ema"


def _env(home: Path) -> dict:
    bin_dir = Path(sys.executable).parent
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
            "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0", "OMP_NUM_THREADS": "1", "LANDSEG_THREADS": "1",
            "GIT_AUTHOR_NAME": "team", "GIT_AUTHOR_EMAIL": "team@example.invalid",
            "GIT_COMMITTER_NAME": "team", "GIT_COMMITTER_EMAIL": "team@example.invalid"}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """sshd on 127.0.0.1:<port> accepting one key for the current user: (port, key file, known_hosts line)."""
    if not Path(SSHD).exists():  # .ci/run installs it: under CI a missing server is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "openssh-server is not installed (Debian: apt install openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("sshd's privilege separation needs root here")
    pytest.importorskip("dvc_ssh")
    root = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "user_key")], check=True)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
                      f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
                      "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n"
                      f"PidFile {root / 'sshd.pid'}\nStrictModes no\nSubsystem sftp internal-sftp\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"sshd did not start: {proc.stderr.read()}")
        time.sleep(0.1)
    host_key = (root / "host_key.pub").read_text().split()
    yield port, root / "user_key", f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def teammate(tmp_path_factory):
    """A teammate's clone after `dvc repro` and one experiment, with a bare git repository as origin."""
    root = tmp_path_factory.mktemp("team")
    home = root / "home"
    home.mkdir()
    env = _env(home)
    bare, repo = root / "team.git", root / "teammate"
    run(["git", "init", "--quiet", "--bare", str(bare)], root, env)
    run(["git", "clone", "--quiet", str(REPO), str(repo)], root, env)
    run(["git", "remote", "set-url", "origin", str(bare)], repo, env)
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "--quiet", "-m", "tiny params"], repo, env)
    run(["git", "push", "--quiet", "origin", "HEAD:main"], repo, env)
    return root, repo, bare, env


def _share_and_pull(teammate, name: str, url: str, local_config: dict, tmp_path: Path) -> None:
    root, repo, bare, env = teammate
    run(["dvc", "remote", "add", "--force", "-d", name, url], repo, env)
    for key, value in local_config.items():
        run(["dvc", "remote", "modify", "--local", name, key, value], repo, env)
    run(["git", "commit", "--quiet", "-am", f"remote {name}"], repo, env)
    run(["git", "push", "--quiet", "origin", "HEAD:main"], repo, env)
    run(["dvc", "push"], repo, env)
    # --temp: the workspace keeps the committed state; the experiment lives in its git ref and the cache
    experiment = f"{EXPERIMENT}-{name}"
    run(["dvc", "exp", "run", "--temp", "-n", experiment, "-S", "distill.ema_decay=0.99"], repo, env)
    run(["dvc", "exp", "push", "origin", experiment], repo, env)

    fresh = tmp_path / "fresh"
    run(["git", "clone", "--quiet", "--branch", "main", str(bare), str(fresh)], tmp_path, env)
    assert not (fresh / "model" / "best").exists() and not (fresh / "data" / "shards").exists()
    for key, value in local_config.items():  # credentials stay in .dvc/config.local, never committed
        run(["dvc", "remote", "modify", "--local", name, key, value], fresh, env)
    run(["dvc", "pull"], fresh, env)
    assert (fresh / "model" / "best" / "model.npz").is_file()
    assert any((fresh / "data" / "shards").rglob("*.npz")) or any(p.is_file() for p in (fresh / "data" / "shards").rglob("*"))
    assert "up to date" in run(["dvc", "status"], fresh, env).lower()
    out = run(["dvc", "repro"], fresh, env)
    assert "Running stage" not in out and "up to date" in out.lower(), out
    metrics = "results/evaluate/metrics.json"
    assert json.loads((fresh / metrics).read_text()) == json.loads((repo / metrics).read_text())
    run(["dvc", "exp", "pull", "origin", experiment], fresh, env)
    shown = run(["dvc", "exp", "list", "--name-only"], fresh, env)
    assert experiment in shown.split(), shown
    run(["dvc", "exp", "apply", experiment], fresh, env)  # the teammate's results, from the remote's cache
    assert "ema_decay: 0.99" in (fresh / "params.yaml").read_text()
    assert (fresh / "model" / "best" / "model.npz").is_file()


def test_local_directory_remote(teammate, tmp_path):
    _share_and_pull(teammate, "nas", str(teammate[0] / "nas"), {}, tmp_path)


def test_ssh_remote(teammate, sshd, tmp_path):
    port, key, known = sshd
    home = teammate[0] / "home"
    (home / ".ssh").mkdir(exist_ok=True)
    (home / ".ssh" / "known_hosts").write_text(known)
    store = teammate[0] / "ssh-store"
    _share_and_pull(teammate, "team", f"ssh://root@127.0.0.1:{port}{store}", {"keyfile": str(key)}, tmp_path)
    assert any(store.rglob("*")), "nothing reached the SSH remote"
