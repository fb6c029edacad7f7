#!/usr/bin/env bash
# Per-round latency of a loopback deployment: 3 nafld sites with TLS, first with
# `fedrnn client` (one long-lived ClientApp per site), then with Flower's stock SuperNode
# (subprocess isolation: a new flwr-clientapp process per message). Prints each run's
# round times from metrics.jsonl. Usage: simulations/deploy_latency.sh [WORKDIR] [ROUNDS]
set -euo pipefail
work=${1:-$(mktemp -d)}
rounds=${2:-3}
mkdir -p "$work" && cd "$work"
trap 'pkill -P $$ || true' EXIT
fedrnn certs certs > /dev/null
fedrnn split sites --clients 3 > /dev/null

fedrnn server --address 127.0.0.1:19300 --certificates certs --min-clients 3 \
    --rounds "$rounds" --out fedrnn-client > server-a.log 2>&1 &
server=$!
for i in 0 1 2; do
    fedrnn client --server 127.0.0.1:19300 --root-cert certs/ca.crt \
        --data "sites/site-$i.csv" --ledger "a-$i.sqlite" > "site-a-$i.log" 2>&1 &
done
wait "$server"
pkill -f "fedrnn client --server 127.0.0.1:19300" || true

fedrnn server --address 127.0.0.1:19301 --certificates certs --min-clients 3 \
    --rounds "$rounds" --out flower-supernode > server-b.log 2>&1 &
server=$!
for i in 0 1 2; do
    FLWR_HOME="$work/home-$i" flower-supernode --superlink 127.0.0.1:19301 \
        --root-certificates "$work/certs/ca.crt" --port $((19310 + i)) \
        --node-config "data=\"$work/sites/site-$i.csv\" ledger=\"$work/b-$i.sqlite\" name=\"site-$i\"" \
        > "site-b-$i.log" 2>&1 &
done
wait "$server"
pkill -f "flower-supernode --superlink 127.0.0.1:19301" || true

python - <<'PY'
import json
for run in ("fedrnn-client", "flower-supernode"):
    rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    print(f"{run:17s} " + "  ".join(f"round {r['round']}: {r['seconds']:.1f}s" for r in rows))
PY
grep -h "train done in" site-a-*.log | sort | sed 's/^/fedrnn-client site /'
