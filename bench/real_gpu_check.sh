#!/usr/bin/env bash
# The real-GPU check: run the exporter against a machine's real NVML, idle and under load, next to
# nvidia-smi's own readings and (when its packages are there) nvitop-exporter, plus what each
# NVML call costs on this driver (bench/nvml_call_costs.py); everything it printed is packed into
# $OUT/results.tar.gz (the device tool brings back only a few files). It needs only python3 and the driver: the packages come as plain
# directories on PYTHONPATH (see docs/exporter.md, "Checked on a real GPU", for how they are made).
#
#   OUT=/tmp/gpu-check bench/real_gpu_check.sh build/device
set -u
PKGS=${1:-build/device}
DEST=${OUT:?set OUT to the folder that receives the results}
OUT=$DEST/results
PY=${PYTHON:-python3}
ROOT=$PWD
PORT=19945
NVITOP_PORT=19946
mkdir -p "$OUT"
work=$(mktemp -d)

export PYTHONPATH="$PWD/$PKGS/mlwarden"
export PYTHONDONTWRITEBYTECODE=1

ours= theirs= load=
# An early exit (the exporter failed to start) must not leave the other exporter or the load running.
trap 'kill $ours $theirs $load 2>/dev/null; rm -rf "$work"' EXIT
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/steps.log"; }
smi() { nvidia-smi --query-gpu=index,name,uuid,driver_version,temperature.gpu,utilization.gpu,utilization.memory,memory.used,memory.total,power.draw,clocks.sm,clocks.mem,pcie.link.gen.current,pcie.link.width.current,mig.mode.current,ecc.mode.current --format=csv >"$1" 2>&1
      nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv >>"$1" 2>&1; }
# urllib rather than curl: the machine may have python3 and nothing else.
fetch() { $PY -c 'import sys, urllib.request; sys.stdout.buffer.write(urllib.request.urlopen(sys.argv[1], timeout=10).read())' "$1" 2>/dev/null; }
scrape() { fetch "http://127.0.0.1:$PORT/metrics" >"$1"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

log "host: $(uname -a)"
log "python: $($PY --version 2>&1)"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
if ! (cd "$work" && $PY -c 'import mlwarden.exporter, pynvml, prometheus_client') >>"$OUT/steps.log" 2>&1; then
    log "cannot import the exporter's packages from $PKGS with $PY: stopping"; exit 1
fi

log "what each NVML call costs, idle"
(cd "$work" && $PY "$ROOT/bench/nvml_call_costs.py" --passes 40 --interval 0.5 --xid-seconds 5) >"$OUT/nvml-call-costs-idle.txt" 2>&1
head -2 "$OUT/nvml-call-costs-idle.txt" | tee -a "$OUT/steps.log"

mkdir -p "$work/backups" "$work/experiments" "$work/state"
# From $work, not the checkout: `python -m` puts the current folder first on sys.path, and the
# checkout's mlwarden/ holds no exporter (the wheel maps exporter/ into it).
(cd "$work" && exec $PY -m mlwarden.cli exporter --gpu-backend nvml --interval 1s --listen-address "127.0.0.1:$PORT" \
    --backup-dir "$work/backups" --experiments-dir "$work/experiments" --state-dir "$work/state" \
    --expected-jobs none --log-level info) >"$OUT/exporter.log" 2>&1 &
ours=$!
if [ -d "$PKGS/nvitop" ]; then
    PYTHONPATH="$PWD/$PKGS/nvitop" $PY -m nvitop_exporter --bind-address 127.0.0.1 --port "$NVITOP_PORT" \
        --interval 1 >"$OUT/nvitop-exporter.log" 2>&1 &
    theirs=$!
fi
for _ in $(seq 50); do fetch "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
sleep 5  # past start-up: the first passes, GPM's first sample
if ! kill -0 "$ours" 2>/dev/null; then log "the exporter exited at start: see exporter.log"; exit 1; fi
if [ -n "$theirs" ] && ! kill -0 "$theirs" 2>/dev/null; then log "nvitop-exporter exited at start"; theirs=; fi
log "exporter up (pid $ours); nvitop-exporter pid ${theirs:-absent}"

smi "$OUT/nvidia-smi-idle.csv"
scrape "$OUT/metrics-idle.txt"
hz=$(getconf CLK_TCK)
window=30
a0=$(cpu_ticks "$ours"); [ -n "$theirs" ] && b0=$(cpu_ticks "$theirs")
sleep "$window"
a1=$(cpu_ticks "$ours"); [ -n "$theirs" ] && b1=$(cpu_ticks "$theirs")
log "idle, collecting every 1 s, not scraped, ${window} s: mlwarden CPU $(awk -v d=$((a1 - a0)) -v hz="$hz" -v w=$window 'BEGIN {printf "%.2f", 100 * d / hz / w}') % of a core, RSS $(( $(rss_kib "$ours") / 1024 )) MiB"
if [ -n "$theirs" ]; then
    log "idle, same window: nvitop-exporter CPU $(awk -v d=$((b1 - b0)) -v hz="$hz" -v w=$window 'BEGIN {printf "%.2f", 100 * d / hz / w}') % of a core, RSS $(( $(rss_kib "$theirs") / 1024 )) MiB"
    fetch "http://127.0.0.1:$NVITOP_PORT/metrics" >"$OUT/nvitop-metrics-idle.txt"
fi

log "load: bench/gpu_load.py for 25 s holding 8 GiB"
$PY bench/gpu_load.py --seconds 25 --memory-gib 8 >"$OUT/gpu_load.log" 2>&1 &
load=$!
sleep 10
for i in 1 2 3; do
    smi "$OUT/nvidia-smi-load-$i.csv"
    scrape "$OUT/metrics-load-$i.txt"
    sleep 3
done
wait "$load"; log "gpu_load exit status $?"
sleep 2
scrape "$OUT/metrics-after-load.txt"

log "scrape latency, 1 and 20 concurrent scrapers over keep-alive connections"
$PY - "$PORT" <<'EOF' 2>&1 | tee -a "$OUT/steps.log"
import http.client, statistics, sys, threading, time
port = int(sys.argv[1])
def worker(n, out, gzip):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", "/metrics", headers=headers)
        body = conn.getresponse().read()
        out.append((time.perf_counter() - t) * 1000)
    out.append(-len(body))
for scrapers, n, gzip in ((1, 300, False), (1, 300, True), (20, 50, False), (20, 50, True)):
    out = []
    threads = [threading.Thread(target=worker, args=(n, out, gzip)) for _ in range(scrapers)]
    for t in threads: t.start()
    for t in threads: t.join()
    size = -min(out)
    times = sorted(x for x in out if x >= 0)
    print(f"{scrapers:>2} scraper(s), gzip={gzip!s:5}: {len(times)} scrapes, body {size} B, "
          f"median {statistics.median(times):.2f} ms, p99 {times[int(len(times) * 0.99) - 1]:.2f} ms")
EOF

kill -TERM "$ours" ${theirs:+"$theirs"}
wait "$ours"; log "exporter exit status after SIGTERM: $?"
[ -n "$theirs" ] && wait "$theirs"
log "exporter log: $(grep -c '' "$OUT/exporter.log") lines, $(grep -c -i -E 'error|warning' "$OUT/exporter.log") with error/warning"

log "what each NVML call costs, under load"
$PY bench/gpu_load.py --seconds 25 --memory-gib 4 >>"$OUT/gpu_load.log" 2>&1 &
load=$!
sleep 3
(cd "$work" && $PY "$ROOT/bench/nvml_call_costs.py" --passes 40 --interval 0.5 --xid-seconds 0) >"$OUT/nvml-call-costs-load.txt" 2>&1
head -2 "$OUT/nvml-call-costs-load.txt" | tee -a "$OUT/steps.log"
wait "$load"
rm -rf "$work"
tar -C "$DEST" -czf "$DEST/results.tar.gz" results && rm -rf "$OUT"
