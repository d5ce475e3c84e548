#!/usr/bin/env bash
# The ring's price on one machine: P processes × 1 compute thread each against one process
# with P threads, on the same problem, alternated PAIRS times; prints each run's rate and
# the medians' ratio. Loopback only (127.0.0.1), free ports from the kernel.
#
#   bash crates/distributed/bench/ring.sh [PAIRS] [ring flags...]
#   bash crates/distributed/bench/ring.sh 3 --tokens 32768 --heads 8 --d 128 --causal
#
# Rates are the whole problem's useful FLOPs (4·d per allowed query-key pair and head)
# over the median of the run's --repeat timings (worker 0's ring call, which ends with a
# barrier, so it is the slowest worker's time).
set -euo pipefail
cd "$(dirname "$0")/../../.."
pairs=${1:-3}; shift || true
flags=("$@"); [ ${#flags[@]} -gt 0 ] || flags=(--tokens 32768 --heads 8 --d 128 --causal)
procs=${PROCS:-2}
cargo build -q --release -p attention-distributed
bin=target/release/attention-ring
ports() { python3 -c "
import socket; s=[socket.socket() for _ in range($procs)]
[x.bind(('127.0.0.1',0)) for x in s]; print(','.join('127.0.0.1:%d'%x.getsockname()[1] for x in s))"; }
ring() {
    local hosts; hosts=$(ports); local logs=()
    for p in $(seq 0 $((procs - 1))); do
        "$bin" -n "$procs" -p "$p" --hosts "$hosts" --compute-threads 1 "${flags[@]}" > "/tmp/ring-bench-$p.log" 2>&1 &
    done
    wait
    grep -o '[0-9.]* GFLOP/s for the whole' /tmp/ring-bench-0.log | cut -d' ' -f1
    grep -ho 'compute .* stalled [0-9.]* s' /tmp/ring-bench-*.log >&2 || true
}
single() { "$bin" --single --compute-threads "$procs" "${flags[@]}" | grep -o '[0-9.]* GFLOP/s' | cut -d' ' -f1; }
grep -m1 'model name' /proc/cpuinfo
echo "flags: ${flags[*]}; $procs processes x 1 thread vs 1 process x $procs threads; $pairs pairs"
r=(); s=()
for i in $(seq 1 "$pairs"); do
    if [ $((i % 2)) -eq 1 ]; then a=$(single); b=$(ring); else b=$(ring); a=$(single); fi
    echo "pair $i: single $a GFLOP/s, ring $b GFLOP/s"; s+=("$a"); r+=("$b")
done
python3 - "${s[*]}" "${r[*]}" <<'PY'
import statistics, sys
s = [float(x) for x in sys.argv[1].split()]; r = [float(x) for x in sys.argv[2].split()]
ms, mr = statistics.median(s), statistics.median(r)
print(f"median: single {ms:.1f} GFLOP/s, ring {mr:.1f} GFLOP/s, ring/single {mr / ms:.3f}")
PY
