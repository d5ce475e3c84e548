#!/usr/bin/env bash
# Ring attention between 2 processes over a link slowed to RATE, on this machine only:
# two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2, reachable from
# nowhere else), each end shaped by tc's token bucket filter. Needs root (ip netns, tc).
# A bench for the scaling model in docs/PERFORMANCE.md, not part of CI.
#
#   sudo bash crates/distributed/bench/slow-link.sh 200mbit --tokens 8192 --heads 8 --d 128 --causal
set -euo pipefail
cd "$(dirname "$0")/../../.."
rate=${1:-200mbit}; shift || true
flags=("$@"); [ ${#flags[@]} -gt 0 ] || flags=(--tokens 8192 --heads 8 --d 128 --causal)
cargo build -q --release -p attention-distributed
bin=$PWD/target/release/attention-ring
cleanup() { ip netns del ring0 2>/dev/null || true; ip netns del ring1 2>/dev/null || true; }
trap cleanup EXIT
cleanup
ip netns add ring0
ip netns add ring1
ip link add veth0 netns ring0 type veth peer name veth1 netns ring1
ip -n ring0 addr add 10.77.0.1/24 dev veth0
ip -n ring1 addr add 10.77.0.2/24 dev veth1
for ns in ring0 ring1; do ip -n $ns link set lo up; done
ip -n ring0 link set veth0 up
ip -n ring1 link set veth1 up
tc -n ring0 qdisc add dev veth0 root tbf rate "$rate" burst 1mb latency 2s
tc -n ring1 qdisc add dev veth1 root tbf rate "$rate" burst 1mb latency 2s
hosts=10.77.0.1:2101,10.77.0.2:2101
echo "link: $rate each way; flags: ${flags[*]}"
ip netns exec ring0 "$bin" -n 2 -p 0 --hosts "$hosts" --compute-threads 1 --timeout 600 "${flags[@]}" > /tmp/slow-link-0.log 2>&1 &
ip netns exec ring1 "$bin" -n 2 -p 1 --hosts "$hosts" --compute-threads 1 --timeout 600 "${flags[@]}" > /tmp/slow-link-1.log 2>&1 &
wait
grep -h '^worker' /tmp/slow-link-0.log /tmp/slow-link-1.log
