#!/usr/bin/env bash
# The built-in demo: a line-based TCP server (p99probe-target) under a request load, where every
# 40th request stalls 30 ms in `stall_here()` and a CPU hog competes for the server's CPU halfway
# through. p99probe records the server and writes flame graphs and scheduler-delay histograms.
# Run through `cargo xtask demo` (which builds everything first), as root.
set -euo pipefail

out=${1:-demo-output}
bin=target/release
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

coproc SERVER { exec "$bin/p99probe-target" server --port 0 --stall-every 40 --stall-ms 30 --duration 30; }
pids+=("$SERVER_PID")
read -r ready port <&"${SERVER[0]}"
[ "$ready" = ready ] || { echo "demo server did not start" >&2; exit 1; }
server_pid=$SERVER_PID
taskset -pc 0 "$server_pid" >/dev/null
echo "demo: server pid $server_pid on 127.0.0.1:$port (pinned to CPU 0)"

"$bin/p99probe-target" client --port "$port" --conns 4 --duration 9 >/dev/null &
pids+=($!)
( sleep 4; exec "$bin/p99probe-target" hog --cpu 0 --duration 2 >/dev/null ) &
pids+=($!)

sleep 1
"$bin/p99probe" record --pid "$server_pid" --duration 7s --out "$out/demo.p99"
"$bin/p99probe" info "$out/demo.p99"
"$bin/p99probe" flamegraph "$out/demo.p99" --kind oncpu -o "$out/oncpu.svg" --folded "$out/oncpu.folded" >/dev/null
"$bin/p99probe" flamegraph "$out/demo.p99" --kind offcpu -o "$out/offcpu.svg" --folded "$out/offcpu.folded" >/dev/null
echo "run-queue delay, whole recording:"
"$bin/p99probe" sched-delay "$out/demo.p99" -o "$out/sched-delay.svg" --text "$out/sched-delay.txt" | sed '$d'
echo "run-queue delay while the CPU hog ran (3s..5s):"
"$bin/p99probe" sched-delay "$out/demo.p99" --from 3s --to 5s --cpu 0 | sed '$!b'
echo
echo "top off-CPU stacks (microseconds blocked):"
"$bin/p99probe" flamegraph "$out/demo.p99" --kind offcpu --top 5
echo
echo "top on-CPU stacks:"
"$bin/p99probe" flamegraph "$out/demo.p99" --kind oncpu --top 5
echo
echo "demo outputs in $out/:"
ls -1 "$out" | sed 's/^/  /'
