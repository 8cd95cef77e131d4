"""The worker container cannot read the droplet's metadata service; the host still can.

DigitalOcean's metadata service (169.254.169.254) serves the droplet's user data, which holds
the registry login and the bucket and Prefect keys, to any process that can reach it. The
cloud-config puts a rule into DOCKER-USER (the chain dockerd keeps for its users' rules, on the
path of forwarded, that is container, traffic only) at every start of docker.

No Docker engine runs here: the rule's placement and ordering are read from the units, and the
guard script the droplet runs is run for real with iptables in a network namespace of its own
(`unshare -rn`), where a stand-in dockerd's chains, a "container" namespace behind a docker0
link and an "outside" namespace holding the metadata address and a public API address are
built. Those tests skip where user namespaces or iptables are not available.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from infra_harness import make_settings
from mlseg_infra.cloud_init import render_public_config

GUARD = "/usr/local/sbin/mlseg-metadata-guard"
GUARD_UNIT = "mlseg-metadata-guard.service"
METADATA = "169.254.169.254"
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _config() -> dict:
    return yaml.safe_load(render_public_config(make_settings()))


def _files(config: dict) -> dict[str, str]:
    return {f["path"]: f["content"] for f in config["write_files"]}


def _unit(config: dict, name: str) -> dict[str, dict[str, list[str]]]:
    """{section: {key: values}} of a unit the cloud-config writes, list settings split."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in _files(config)[f"/etc/systemd/system/{name}"].splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            sections.setdefault(section, {}).setdefault(key, []).extend(value.split())
    return sections


def test_the_rule_is_put_back_at_every_start_of_docker_after_dockerd_made_its_chain():
    """iptables rules do not survive a reboot, and DOCKER-USER is dockerd's to create: a rule
    added before dockerd starts fails (no chain), and a chain made ahead of an older dockerd
    is left without its jump from FORWARD. The guard runs after docker.service, each time it
    starts, and is enabled where the units are first started."""
    config = _config()
    guard = _unit(config, GUARD_UNIT)
    assert "docker.service" in guard["Unit"]["After"]
    assert "docker.service" in guard["Unit"]["Requires"]
    assert "docker.service" in guard["Unit"]["PartOf"]  # a docker restart runs it again
    assert guard["Install"]["WantedBy"] == ["docker.service"]  # every start of docker, boots too
    assert guard["Service"]["Type"] == ["oneshot"] and guard["Service"]["RemainAfterExit"] == [
        "yes"
    ]
    assert guard["Service"]["ExecStart"] == [GUARD]
    assert _files(config)[GUARD].startswith("#!/bin/sh\n")
    runcmd = config["runcmd"]
    docker = runcmd.index(["systemctl", "enable", "--now", "docker.service"])
    enabled = runcmd.index(["systemctl", "enable", "--now", GUARD_UNIT])
    worker = runcmd.index(["systemctl", "enable", "--now", "--no-block", "mlseg-worker.service"])
    assert docker < enabled < worker


def test_the_worker_never_runs_without_the_rule():
    worker = _unit(_config(), "mlseg-worker.service")["Unit"]
    assert GUARD_UNIT in worker["Requires"]  # a failed guard keeps the worker stopped
    assert GUARD_UNIT in worker["After"]


def test_only_forwarded_traffic_to_the_metadata_address_is_refused():
    """The rule sits in DOCKER-USER, which only FORWARD jumps to: cloud-init and the droplet
    agent (host processes, OUTPUT) keep the service; nothing else a container reaches (the
    Prefect API, the registry, the bucket) matches the one address."""
    script = _files(_config())[GUARD]
    rules = [
        shlex.split(line.strip().removeprefix("|| "))
        for line in script.replace("\\\n", "\n").splitlines()
        if line.strip().removeprefix("|| ").startswith("iptables")
    ]
    changes = [r for r in rules if {"-I", "-A"} & set(r)]
    assert changes, script
    for rule in changes:
        flag = "-I" if "-I" in rule else "-A"
        assert rule[rule.index(flag) + 1] == "DOCKER-USER", rule
        assert rule[rule.index("-d") + 1] == f"{METADATA}/32", rule
        assert not {"-t", "-s", "-i", "-o"} & set(rule), rule


# --- the guard run with iptables, in network namespaces of its own ---------------------------

_TOOLS = [shutil.which(t, path=PATH) for t in ("unshare", "nsenter", "ip", "iptables")]


def _namespaces_work() -> bool:
    if None in _TOOLS:
        return False
    probe = "iptables -w -N PROBE && ip link add probe0 type veth peer name probe1"
    ran = subprocess.run(
        ["unshare", "-rn", "sh", "-c", probe],
        capture_output=True,
        timeout=60,
        env={"PATH": PATH},
    )
    return ran.returncode == 0


needs_namespaces = pytest.mark.skipif(
    not _namespaces_work(),
    reason="needs unshare, nsenter, ip and iptables, and user and network namespaces "
    "(`unshare -rn`); Debian: `apt-get install -y iptables iproute2 util-linux`",
)

# Inside `unshare -rn`: this namespace is the droplet. C is the worker container behind a
# veth named docker0 (172.17.0.0/16, as Docker's default bridge), O the outside: the metadata
# address and a public address (the Prefect API, registry and bucket alike) on one link.
# dockerd's chains are made as dockerd makes them: FORWARD's policy DROP, a jump to DOCKER-USER
# first, then DOCKER-FORWARD, which accepts the containers' traffic; before Docker 28,
# DOCKER-USER ended in a RETURN (OLD_DOCKER=1).
_TOPOLOGY = r"""
set -eu
unshare -n sleep 120 >/dev/null 2>&1 & C=$!
unshare -n sleep 120 >/dev/null 2>&1 & O=$!
trap 'kill $C $O ${SERVER:-} 2>/dev/null' EXIT
sleep 0.3
inC() { nsenter --net=/proc/$C/ns/net "$@"; }
inO() { nsenter --net=/proc/$O/ns/net "$@"; }
ip link set lo up
ip link add docker0 type veth peer name ceth
ip link set ceth netns $C
ip addr add 172.17.0.1/16 dev docker0 && ip link set docker0 up
inC ip link set lo up && inC ip link set ceth name eth0
inC ip addr add 172.17.0.2/16 dev eth0 && inC ip link set eth0 up
inC ip route add default via 172.17.0.1
ip link add eth0 type veth peer name oeth
ip link set oeth netns $O
ip addr add 169.254.0.5/16 dev eth0 && ip addr add 203.0.113.1/24 dev eth0 && ip link set eth0 up
inO ip link set lo up && inO ip addr add 169.254.169.254/16 dev oeth
inO ip addr add 203.0.113.10/24 dev oeth && inO ip link set oeth up
inO ip route add 172.17.0.0/16 via 203.0.113.1
echo 1 > /proc/sys/net/ipv4/ip_forward
nsenter --net=/proc/$O/ns/net "$PY" -c "$SERVE" >/dev/null 2>&1 & SERVER=$!
sleep 0.5
probe() { "$PY" -c "$PROBE" "$1"; }
if [ "$DOCKERD" = 1 ]; then
  iptables -w -P FORWARD DROP
  iptables -w -N DOCKER-USER && iptables -w -N DOCKER-FORWARD
  iptables -w -A FORWARD -j DOCKER-USER && iptables -w -A FORWARD -j DOCKER-FORWARD
  iptables -w -A DOCKER-FORWARD -i docker0 -j ACCEPT
  iptables -w -A DOCKER-FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
  if [ "$OLD_DOCKER" = 1 ]; then iptables -w -A DOCKER-USER -j RETURN; fi
fi
echo "before=$(inC "$PY" -c "$PROBE" $METADATA)"
for start in 1 2; do  # boot, then a restart of docker
  if sh "$GUARD" >guard.out 2>&1; then echo "guard$start=0"; else echo "guard$start=$?"; fi
done
echo "container_metadata=$(inC "$PY" -c "$PROBE" $METADATA)"
echo "container_api=$(inC "$PY" -c "$PROBE" 203.0.113.10)"
echo "host_metadata=$(probe $METADATA)"
echo "rules=$(iptables -w -S | grep -c -- "-d $METADATA" || true)"
echo "chain=$(iptables -w -n -L DOCKER-USER >/dev/null 2>&1 && echo yes || echo no)"
"""
_SERVE = """
import socket
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("0.0.0.0", 80))
server.listen()
server.settimeout(60)  # gone by itself, should the script that started it be killed
while True:
    conn, _ = server.accept()
    conn.sendall(b"ok")
    conn.close()
"""
_PROBE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 80), timeout=5) as conn:
        print(conn.recv(2).decode())
except OSError as error:
    print(type(error).__name__)
"""


def _run_guard(tmp_path: Path, *, dockerd: bool, old_docker: bool = False) -> dict[str, str]:
    guard = tmp_path / "mlseg-metadata-guard"
    guard.write_text(_files(_config())[GUARD])
    env = {
        "PATH": PATH,
        "PY": sys.executable,
        "SERVE": _SERVE,
        "PROBE": _PROBE,
        "GUARD": str(guard),
        "METADATA": METADATA,
        "DOCKERD": "1" if dockerd else "0",
        "OLD_DOCKER": "1" if old_docker else "0",
    }
    ran = subprocess.run(
        ["unshare", "-rn", "bash", "-c", _TOPOLOGY],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = dict(line.split("=", 1) for line in ran.stdout.splitlines() if "=" in line)
    result["guard_output"] = (tmp_path / "guard.out").read_text()
    return result


@needs_namespaces
@pytest.mark.parametrize("old_docker", [False, True], ids=["docker-28", "docker-before-28"])
def test_the_container_is_refused_the_metadata_service_and_keeps_the_rest(tmp_path, old_docker):
    result = _run_guard(tmp_path, dockerd=True, old_docker=old_docker)
    assert result["before"] == "ok"  # without the guard, the container reads the user data
    assert (result["guard1"], result["guard2"]) == ("0", "0"), result["guard_output"]
    # refused at once, not left to time out
    assert result["container_metadata"] == "ConnectionRefusedError"
    assert result["container_api"] == "ok"  # Prefect API, registry, bucket
    assert result["host_metadata"] == "ok"  # cloud-init, the droplet agent
    assert result["rules"] == "1"  # a restart of docker does not add a second


@needs_namespaces
def test_the_guard_fails_and_makes_no_chain_where_dockerd_made_none(tmp_path):
    """Run before dockerd (or with Docker's iptables off) it fails, so the worker that
    requires it stays stopped, and it does not make DOCKER-USER itself, which would leave an
    older dockerd adding no jump to the chain."""
    result = _run_guard(tmp_path, dockerd=False)
    assert result["guard1"] != "0"
    assert "no DOCKER-USER chain" in result["guard_output"]
    assert result["chain"] == "no"
