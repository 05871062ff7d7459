#!/usr/bin/env bash
# The seed's own deployment, one IP per machine, all on port 5000: every member
# (tracker, six nodes, alice, bob) in a network namespace of its own, each with
# one address on a bridge, then the end-to-end check inside them. See README.md.
#
#   sudo tests/netns/run.sh [--python PATH] [--run-dir DIR] [--prefix NAME] [--keep]
#
# Prints PASS or FAIL last. Exit status: 0 PASS, 1 FAIL, 2 cannot run here
# (not root, no `ip`, namespaces not allowed). Whatever happens, every process
# started in the namespaces is killed and every namespace is deleted (which
# deletes the bridge and the veth pairs inside them); the root namespace's
# interfaces, addresses and routes are never touched.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-}
RUN_DIR=
KEEP=0
PREFIX="ot$$-"            # namespaces: ${PREFIX}br, ${PREFIX}tracker, ${PREFIX}node1 … (unique per run)
SUBNET=10.213.0           # a private /24 that exists only inside these namespaces
BRIDGE_IP=$SUBNET.1       # the bridge namespace's own address: where the check runs from
BASE_HOST=10              # tracker .10, nodes .11–.16, alice .21, bob .22 (LocalNetwork's layout)
NODES=6
DEADLINE=${DEADLINE:-150} # seconds for the whole check inside the namespaces

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ "$#" -gt 0 ]; do
  case "$1" in
    --python) PYTHON=$2; shift 2 ;;
    --run-dir) RUN_DIR=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [ -z "$PYTHON" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi

cannot() { echo "cannot run: $*" >&2; echo "SKIP"; exit 2; }
[ "$(id -u)" -eq 0 ] || cannot "network namespaces need root"
command -v ip >/dev/null 2>&1 || cannot "no 'ip' command (install iproute2)"
"$PYTHON" -c 'import onion_twisted, twisted' 2>/dev/null || cannot "$PYTHON cannot import onion_twisted"

MEMBERS=(tracker)
for i in $(seq 1 "$NODES"); do MEMBERS+=("node$i"); done
MEMBERS+=(alice bob)
declare -A HOST=([tracker]=$BASE_HOST [alice]=$((BASE_HOST + 11)) [bob]=$((BASE_HOST + 12)))
for i in $(seq 1 "$NODES"); do HOST[node$i]=$((BASE_HOST + i)); done

CREATED=()                # namespaces this run made, in order
CHECK_PID=
MADE_RUN_DIR=0

cleanup() {
  local status=$? ns pids
  set +e
  trap - EXIT INT TERM HUP
  if [ -n "$CHECK_PID" ] && kill -0 "$CHECK_PID" 2>/dev/null; then
    kill -TERM "$CHECK_PID" 2>/dev/null  # the check stops its members gracefully …
    for _ in $(seq 1 100); do kill -0 "$CHECK_PID" 2>/dev/null || break; sleep 0.1; done
  fi
  for ns in "${CREATED[@]}"; do           # … and whatever is left is killed here
    pids=$(ip netns pids "$ns" 2>/dev/null)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  done
  for ns in "${CREATED[@]}"; do
    for _ in 1 2 3 4 5; do
      ip netns del "$ns" 2>/dev/null && break
      sleep 0.2
    done
  done
  local left
  left=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -F -- "$PREFIX" || true)
  if [ -n "$left" ]; then
    echo "cleanup: namespaces left behind: $left" >&2
    [ "$status" -eq 0 ] && status=1
  fi
  # A run dir of our own goes, unless asked to keep it or the check failed (its logs tell why).
  if [ "$MADE_RUN_DIR" -eq 1 ] && [ "$KEEP" -eq 0 ] && [ "$status" -eq 0 ]; then rm -rf "$RUN_DIR"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [ -z "$RUN_DIR" ]; then RUN_DIR=$(mktemp -d /tmp/onion-netns.XXXXXX); MADE_RUN_DIR=1; fi
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# --- the network: a bridge in a namespace of its own, one namespace per member -------------
BR=${PREFIX}br
add_ns() {
  ip netns add "$1" || cannot "ip netns add $1 failed (no CAP_SYS_ADMIN in this container?)"
  CREATED+=("$1")
  ip -n "$1" link set lo up
}
add_ns "$BR"
ip -n "$BR" link add br0 type bridge
ip -n "$BR" addr add "$BRIDGE_IP/24" dev br0
ip -n "$BR" link set br0 up
for m in "${MEMBERS[@]}"; do
  ns=$PREFIX$m
  add_ns "$ns"
  # Both ends are made inside the namespaces: nothing appears in the root namespace.
  ip -n "$BR" link add "v$m" type veth peer name eth0 netns "$ns"
  ip -n "$BR" link set "v$m" master br0 up
  ip -n "$ns" addr add "$SUBNET.${HOST[$m]}/24" dev eth0
  ip -n "$ns" link set eth0 up
done
echo "namespaces: $BR (bridge, $BRIDGE_IP) and ${#MEMBERS[@]} members ${PREFIX}tracker … ${PREFIX}bob on $SUBNET.0/24"

# --- the check, run from the bridge namespace ($BRIDGE_IP) ---------------------------------
# LocalNetwork (what ./scripts/demo runs) starts each member through `ip netns exec NS`,
# at LocalNetwork's usual layout from $SUBNET.$BASE_HOST, all on port 5000. Alice asks for
# bob's file and bob for alice's, at once, each with `python -m onion_twisted get` run in
# its own namespace against its own API; both copies are checked by sha256; then every
# member stops gracefully and the logs are searched: the tracker's log, page and metrics
# never name a peer's IP, no node's log names a peer's IP or a shared file's name.
CHECK=$(cat <<'PY'
import hashlib, json, os, re, signal, ssl, subprocess, sys, time, urllib.request
from pathlib import Path
from onion_twisted.ops.localnet import SAMPLES, LocalNetwork

prefix, subnet, base_host, nodes = os.environ["NS_PREFIX"], os.environ["NS_SUBNET"], int(os.environ["NS_BASE"]), int(os.environ["NS_NODES"])
run_dir, deadline = Path(os.environ["NS_RUN_DIR"]), time.monotonic() + float(os.environ["NS_DEADLINE"])
BIG_MIB, ALICE_NAME, ALICE_SIZE = 2, "alice holiday.bin", 300 * 1024
BOB_NAME = f"big-{BIG_MIB}MiB.bin"
# The members speak TLS (conf's default) with self-signed certificates: the tracker's page is
# asked over TLS without checking its certificate; the peers' pages are plain HTTP at ui_listen.
unverified = ssl.create_default_context()
unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=unverified))
problems = []

def say(text):
    print(text, flush=True)

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def get(url):
    with opener.open(url, timeout=5) as r:
        return r.read().decode("utf-8", "replace")

def mentions(text, needle):
    return re.search(r"(?<![\w.])" + re.escape(needle) + r"(?!\w)", text) is not None

def tail(name, lines=20):
    out = []
    for path in (run_dir / name / f"{name}.log", run_dir / name / "stderr.log"):
        if path.exists():
            out.append(f"--- {name}/{path.name}\n" + "\n".join(path.read_text("utf-8", "replace").splitlines()[-lines:]))
    return "\n".join(out)

share = run_dir / "alice" / "share"
share.mkdir(parents=True, exist_ok=True)
(share / ALICE_NAME).write_bytes(os.urandom(ALICE_SIZE))
net = LocalNetwork(run_dir, base=f"{subnet}.{base_host}", port=5000, nodes=nodes, big_mib=BIG_MIB, key_bits=1024,
                   wrap=lambda name: ["ip", "netns", "exec", prefix + name],
                   # The check runs on the bridge: the peers' API and the tracker's page and
                   # /metrics (metrics_allow, loopback by default) must let it in.
                   extra={"peer": {"ui_allow": f"127.0.0.0/8,{subnet}.0/24"},
                          "tracker": {"metrics_allow": f"127.0.0.0/8,{subnet}.1"}})
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the members
try:
    started = time.monotonic()
    net.start(timeout=60)
    say(f"network up in {time.monotonic() - started:.1f} s: tracker {net.tracker_ip}, nodes {net.node_ips[0]}"
        f"–{net.node_ips[-1]}, alice {net.peer_ips['alice']}, bob {net.peer_ips['bob']}, port {net.port}")
    shas = {ALICE_NAME: sha256(share / ALICE_NAME), BOB_NAME: sha256(run_dir / "bob" / "share" / BOB_NAME)}
    wants = {"alice": BOB_NAME, "bob": ALICE_NAME}
    for who, name in wants.items():  # the other's file in its catalogue first
        while True:
            status = json.loads(get(f"{net.page(who)}api/status"))
            if any(f.get("name") == name and f.get("sha256") == shas[name] for f in status["catalogue"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} never appeared in {who}'s catalogue")
            time.sleep(0.2)
    started = time.monotonic()
    gets = {who: subprocess.Popen(
        ["ip", "netns", "exec", prefix + who, sys.executable, "-m", "onion_twisted", "get", name,
         "--peer", net.page(who), "--sha256", shas[name],
         "--timeout", str(max(5, int(deadline - time.monotonic() - 15)))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who, name in wants.items()}
    for who, p in gets.items():
        out, err = p.communicate()
        name = wants[who]
        if p.returncode != 0:
            problems.append(f"{who}'s get {name!r} exited {p.returncode}: {err.strip()[-500:]}")
            continue
        copy = run_dir / who / "downloads" / name
        if not copy.is_file() or sha256(copy) != shas[name]:
            problems.append(f"{who}'s copy of {name!r} does not match its sha256")
        else:
            say(f"{who} got {name!r} through {who}'s own API in {time.monotonic() - started:.1f} s: "
                f"sha256 {shas[name][:16]}… matches ({out.strip()})")
    page = get(net.url(net.tracker_ip, "/"))
    metrics = get(net.url(net.tracker_ip, "/metrics"))
except Exception as e:
    problems.append(f"{type(e).__name__}: {e}")
    page = metrics = None
finally:
    net.stop()  # SIGTERM: every member flushes its log

if page is not None:
    peer_ips = list(net.peer_ips.values())
    names = {ALICE_NAME, BOB_NAME, *(n for files in SAMPLES.values() for n in files)}
    logs = {m: (run_dir / m / f"{m}.log").read_text("utf-8", "replace") if (run_dir / m / f"{m}.log").exists() else ""
            for m in ["tracker", *(f"node{i}" for i in range(1, nodes + 1)), "alice", "bob"]}
    # The searches can find what they look for: the peers' own logs name their IPs, the page the files.
    for who in ("alice", "bob"):
        if not mentions(logs[who], net.peer_ips[who]):
            problems.append(f"{who}'s log does not name {who}'s IP: the search proves nothing")
    if not all(mentions(page, n) for n in (ALICE_NAME, BOB_NAME)):
        problems.append("the tracker's page does not list the shared files: the search proves nothing")
    for what, text, needles in [("the tracker's log", logs["tracker"], peer_ips), ("the tracker's page", page, peer_ips),
                                ("the tracker's /metrics", metrics, peer_ips)] + \
                               [(f"node{i}'s log", logs[f"node{i}"], [*peer_ips, *names]) for i in range(1, nodes + 1)]:
        if not text.strip():
            problems.append(f"{what} is empty")
        found = sorted(n for n in needles if mentions(text, n))
        if found:
            problems.append(f"{what} names {found}")
    if not problems:
        say("no peer IP in the tracker's log, page or metrics; no peer IP nor file name in any node's log")
for p in problems:
    say(f"problem: {p}")
if problems:
    for m in ("tracker", "node1", "alice", "bob"):
        say(tail(m))
sys.exit(1 if problems else 0)
PY
)

cd "$REPO"
# In the background, so that a signal to this script is handled at once (by cleanup).
NS_PREFIX=$PREFIX NS_SUBNET=$SUBNET NS_BASE=$BASE_HOST NS_NODES=$NODES NS_RUN_DIR=$RUN_DIR NS_DEADLINE=$DEADLINE \
  timeout -k 10 "$((DEADLINE + 30))" ip netns exec "$BR" "$PYTHON" -c "$CHECK" &
CHECK_PID=$!
set +e
wait "$CHECK_PID"
status=$?
set -e
CHECK_PID=
if [ "$status" -eq 0 ]; then echo "PASS"; else echo "FAIL (the check exited $status; logs under $RUN_DIR)"; exit 1; fi
