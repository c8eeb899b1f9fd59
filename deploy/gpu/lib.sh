# Shell helpers of deploy/gpu-check.sh (sourced, not run): messages, the time budget, the
# results table, bounded commands, the reference server's start-up, staging the bundle and
# finding the CUDA libraries. They read the driver's variables: bin, stage, budget, started.

say() { echo "gpu-check: $*" >&2; }

# Seconds left of the whole script's budget.
left() { echo $((budget - ($(date +%s) - started))); }

# Seconds a step may take: its own limit, cut to what the budget has left (minus 15 s for
# the table). Zero or less: the step is not started.
limit_for() {
  local l
  l=$(($(left) - 15))
  if ((l < $1)); then echo "$l"; else echo "$1"; fi
}

# Results: one file per check, `status<TAB>what<TAB>measure`, kept in the stage so that a
# later invocation's table shows them too. Status is PASS, FAIL or info (a measurement
# with no pass/fail criterion).
record() { printf '%s\t%s\t%s\n' "$2" "$3" "$4" >"$stage/results/$1"; }

# Background processes to stop however the script ends.
pids=()
cleanup() {
  trap '' INT TERM
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  pids=()
}

# Stops one process: TERM, up to 10 s to exit, then KILL.
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  local _
  for _ in $(seq 1 20); do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# Prints a log's error lines and tail, indented, to stderr.
show_log() {
  { grep -m 5 -iE 'error|panicked' "$1" || true; echo "..."; tail -n 8 "$1"; } |
    cut -c1-300 | sed 's/^/    | /' >&2
}

# bounded SECS LOG CMD...: runs CMD with its output appended to LOG, killed after SECS;
# on failure or timeout says so and shows the log.
bounded() {
  local secs=$1 log=$2
  shift 2
  if ((secs <= 0)); then echo "no time left in the budget" >>"$log"; return 124; fi
  local rc=0
  timeout -k 10 "$secs" "$@" >>"$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    if ((rc == 124 || rc == 137)); then say "timed out after ${secs}s: $*"; else say "failed ($rc): $*"; fi
    show_log "$log"
  fi
  return "$rc"
}

# wait_serving URL SECS PID: waits until the server at URL (process PID) reports SERVING
# through its health check, at most SECS seconds; fails at once if PID exits.
wait_serving() {
  "$bin/ref-server" health --server "$1" --wait "$2" --server-pid "$3" >/dev/null
}

# start_server SECS LOG SERVE-ARGS...: starts `ref-server serve` on a free loopback port in
# the background and waits, at most SECS seconds, until it is SERVING. Sets server_pid and
# url; on failure shows the server's log and returns 1.
start_server() {
  local secs=$1 log=$2
  shift 2
  local deadline=$(($(date +%s) + secs)) addr=""
  "$bin/ref-server" serve --listen 127.0.0.1:0 "$@" >"$log.stdout" 2>"$log" &
  server_pid=$!
  pids+=("$server_pid")
  url=""
  # The server prints `listening on IP:PORT` as soon as it is bound, before loading.
  while [[ -z $addr ]] && (($(date +%s) < deadline)); do
    kill -0 "$server_pid" 2>/dev/null || break
    addr=$(sed -n 's/^listening on //p' "$log.stdout" | head -n 1)
    [[ -n $addr ]] || sleep 0.2
  done
  if [[ -n $addr ]] && wait_serving "http://$addr" $((deadline - $(date +%s))) "$server_pid"; then
    url=http://$addr
    return 0
  fi
  if kill -0 "$server_pid" 2>/dev/null; then
    say "ref-server was not SERVING within ${secs}s:"
  else
    say "ref-server exited during start-up:"
  fi
  tail -n 15 "$log" >&2
  return 1
}

# stage_bundle BUNDLE: moves the bundle parts found in BUNDLE (each a directory with a
# MANIFEST) into the stage, reassembles the SmolLM2 GGUF once all its parts are there
# (checked against the manifest's SHA-256) and unpacks the binaries. Sets gguf_staged to
# the GGUF's path, or empty while parts are missing.
stage_bundle() {
  local part
  for part in "$1"/*/; do
    [[ -f $part/MANIFEST ]] || continue
    say "staging $(basename "$part") ($(du -sh "$part" | cut -f1))"
    cp -f "$part"/* "$stage/bundle/"
  done
  gguf_staged=""
  [[ -f $stage/bundle/MANIFEST ]] || return 0
  local parts want have=0 got i
  parts=$(sed -n 's/^gguf_parts //p' "$stage/bundle/MANIFEST")
  want=$(sed -n 's/^gguf_sha256 //p' "$stage/bundle/MANIFEST")
  if [[ -s $stage/smollm2.gguf && -f $stage/smollm2.gguf.sha256 && $(cat "$stage/smollm2.gguf.sha256") == "$want" ]]; then
    gguf_staged=$stage/smollm2.gguf
  else
    for i in $(seq 1 "$parts"); do [[ -f $stage/bundle/smollm2.gguf.part$i ]] && have=$((have + 1)); done
    if [[ $have == "$parts" ]]; then
      for i in $(seq 1 "$parts"); do cat "$stage/bundle/smollm2.gguf.part$i"; done >"$stage/smollm2.gguf.tmp"
      got=$(sha256sum "$stage/smollm2.gguf.tmp" | cut -d' ' -f1)
      if [[ $got == "$want" ]]; then
        mv "$stage/smollm2.gguf.tmp" "$stage/smollm2.gguf"
        echo "$want" >"$stage/smollm2.gguf.sha256"
        rm -f "$stage"/bundle/smollm2.gguf.part*
        gguf_staged=$stage/smollm2.gguf
      else
        say "the reassembled GGUF's SHA-256 is $got, the manifest says $want: parts from different bundles?"
        rm -f "$stage/smollm2.gguf.tmp"
      fi
    else
      say "SmolLM2 GGUF: $have of $parts parts staged (copy the other part of the bundle too)"
    fi
  fi
  if [[ -f $stage/bundle/bin.tar.xz && (! -d $stage/bin || $stage/bundle/bin.tar.xz -nt $stage/bin) ]]; then
    rm -rf "$stage/bin" && mkdir -p "$stage/bin"
    # Python's tarfile where tar has no xz support.
    tar -xJf "$stage/bundle/bin.tar.xz" -C "$stage/bin" 2>/dev/null ||
      python3 -m tarfile -e "$stage/bundle/bin.tar.xz" "$stage/bin"
    touch "$stage/bin"
  fi
}

# find_cuda_libraries: puts the directories of the CUDA libraries the binaries load on
# LD_LIBRARY_PATH, or fails naming the missing ones. The binaries link them dynamically:
# libcuda from the driver; cuBLAS, cuRAND, NVRTC and cudart from a CUDA 13 install or the
# PyPI wheels (PyTorch's nvidia-* packages have them). They are found here, not carried in
# the bundle: cuBLAS alone is 500 MB.
find_cuda_libraries() {
  local dirs=() d lib missing
  while IFS= read -r d; do dirs+=("$d"); done < <(python3 deploy/gpu/cuda_lib_dirs.py 2>/dev/null || true)
  dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64
    /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
  for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    ldconfig -p 2>/dev/null | grep -q "$lib " && continue
    for d in "${dirs[@]}"; do
      if [[ -e $d/$lib ]]; then
        export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        break
      fi
    done
  done
  missing=$(ldd "$bin/policy-trainer" | grep 'not found' || true)
  if [[ -n $missing ]]; then
    say "libraries the binaries need are missing on this machine:"
    echo "$missing" >&2
    say "searched: ldconfig, ${dirs[*]}"
    return 1
  fi
}
