#!/usr/bin/env bash
# Writes tests/data/legacy/: keystores in the legacy subject-key form, made by
# keywarden as of df0a846 (before the subject-key domain). $1: that binary;
# $2: a PostgreSQL URL to an empty database (for the PostgreSQL dump).
set -euo pipefail
old=$1 pg=$2
out=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
make_one() { # $1 name, $2.. extra serve args
  local name=$1; shift
  local dir=$work/$name
  export KEYWARDEN_DATA_DIR=$dir KEYWARDEN_ADDR=127.0.0.1:17411
  "$old" serve --data-dir "$dir" --listen 127.0.0.1:17411 "$@" >"$work/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do grep -q 'keywarden serving' "$work/$name.log" && break; sleep 0.1; done
  "$old" tenant create legacy-a >/dev/null
  "$old" tenant create legacy-b >/dev/null
  local rows=()
  enc() { # tenant subject plaintext
    local ct; ct=$("$old" encrypt --tenant "$1" ${2:+--subject "$2"} --context table=people "$3")
    rows+=("{\"tenant\":\"$1\",\"subject\":\"$2\",\"context\":{\"table\":\"people\"},\"plaintext\":\"$3\",\"ciphertext\":\"$ct\"}")
  }
  enc legacy-a alice "alice's record"
  enc legacy-a bob "bob's record"
  enc legacy-b alice "alice at b"
  enc legacy-a "" "tenant-key data"
  "$old" tenant rotate legacy-a >/dev/null
  enc legacy-a carol "carol, wrapped by version 2"
  enc legacy-a alice "alice again, same subject key (wrapped by version 1)"
  "$old" subject shred --tenant legacy-a bob >/dev/null
  kill -TERM $pid; wait $pid || true
  (IFS=,; echo "[${rows[*]}]") | python3 -m json.tool >"$out/$name-ciphertexts.json"
}
make_one sqlite
# One self-contained file: fold the write-ahead log in.
python3 -c 'import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute("PRAGMA wal_checkpoint(TRUNCATE)"); c.execute("PRAGMA journal_mode=DELETE"); c.close()' "$work/sqlite/keystore.sqlite3"
cp "$work/sqlite/keystore.sqlite3" "$out/sqlite-keystore.sqlite3"
cp "$work/sqlite/root.key" "$out/root.key"
KEYWARDEN_STORE_BACKEND=postgres KEYWARDEN_DATABASE_URL=$pg \
  make_one postgres
# the PostgreSQL keystore was wrapped by its own data dir's root key
cp "$work/postgres/root.key" "$out/postgres-root.key"
# psql meta-commands (\restrict) dropped: the tests run the dump through sqlx.
pg_dump --inserts --no-owner --no-privileges "$pg" | grep -v "^\\\\" >"$out/postgres-keystore.sql"
