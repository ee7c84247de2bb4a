#!/usr/bin/env bash
# The built-in demo. A small HTTP server (p99probe-target, pinned to CPU 0) runs under wrk (on
# CPU 1). Nine seconds in, for three seconds, every 40th request sleeps 25 ms in `stall_here()`:
# the injected spike. `p99probe attach` watches the server's request latency from the kernel,
# captures the window around the spike and prints its verdict. Then `p99probe report` explains
# the same spike again, post-mortem, from the capture's recording alone.
# Run through `cargo xtask demo` (which builds everything first), as root.
set -euo pipefail

out=${1:-demo-output}
bin=target/release
rm -rf "$out"
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

coproc SERVER { exec taskset -c 0 "$bin/p99probe-target" server --port 0 --response-bytes 512 \
    --stall-every 40 --stall-ms 25 --inject-after 9 --inject-for 3 --duration 40; }
pids+=("$SERVER_PID")
read -r ready port <&"${SERVER[0]}"
[ "$ready" = ready ] || { echo "demo server did not start" >&2; exit 1; }
server_pid=$SERVER_PID
echo "demo: HTTP server pid $server_pid on 127.0.0.1:$port (CPU 0); wrk on CPU 1 for 18 s;"
echo "demo: from 9 s to 12 s every 40th request sleeps 25 ms in stall_here()"

taskset -c 1 wrk -t1 -c8 -d18s "http://127.0.0.1:$port/" > "$out/wrk.txt" &
wrk_pid=$!
pids+=("$wrk_pid")

"$bin/p99probe" attach --pid "$server_pid" --p99 10ms --pre 2s --post 1s --baseline 4s \
    --max-captures 1 --duration 16s --out "$out/captures"

capture=$(ls -d "$out"/captures/*/ | head -1)
echo
echo "== $capture"
ls -1 "$capture" | sed 's/^/  /'
echo
sed -n '1,/^## Latency/p' "$capture/report.md" | sed '$d'
echo "== post-mortem: p99probe report on the capture's recording (worst P99 window found by itself)"
"$bin/p99probe" report "$capture/recording.p99" --out "$out/post-mortem"
wait "$wrk_pid" || true
echo
echo "wrk:"; grep -E "Latency|Requests/sec" "$out/wrk.txt" | sed 's/^/  /'
