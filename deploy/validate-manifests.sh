#!/usr/bin/env bash
# Validates the deployment assets; CI runs it. Exits non-zero, with each checker's own
# message, if any of them is invalid.
#
#   deploy/validate-manifests.sh
#
# 1. deploy/k8s/*.yaml (every Kubernetes object) against the official JSON schemas, strictly
#    (unknown fields are errors), with kubernetes-validate from PyPI. Its schemas are bundled,
#    so after the first run (which creates the venv) it works offline. Checked against each
#    version in K8S_VERSIONS.
# 2. deploy/k8s/kustomization.yaml (not a Kubernetes object, so no schema): every resource it
#    lists exists and every manifest is listed (except the example Secret); when kubectl is
#    installed, `kubectl kustomize` must render it and the rendered objects are validated too.
# 3. deploy/systemd/ref-server.service: `systemd-analyze verify` when systemd-analyze exists
#    (any warning is an error; the ExecStart binary is replaced by a stub because it is not
#    installed here), and always a lint of what this project requires of the unit.
#
# Environment: VALIDATE_VENV (default .cache/validate-venv), K8S_VERSIONS (default
# "1.29.0 1.37.0": the oldest we support and the newest the checker knows).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

venv=${VALIDATE_VENV:-$root/.cache/validate-venv}
checker_version=1.37.0
k8s_versions=${K8S_VERSIONS:-"1.29.0 1.37.0"}
k8s_dir=deploy/k8s
unit=deploy/systemd/ref-server.service

failures=()
fail() { failures+=("$1"); echo "FAIL: $1" >&2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------- the checker, once
kv=$venv/bin/kubernetes-validate
if [[ ! -x $kv ]] || [[ $("$kv" --version 2>/dev/null) != "$checker_version" ]]; then
  echo "== installing kubernetes-validate $checker_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$checker_version"
fi
py=$venv/bin/python # has PyYAML (a kubernetes-validate dependency)

# Runs kubernetes-validate; a file it could not check (a kind with no schema) is a failure
# too, since it reports that as a warning and exits 0.
validate() {
  local label=$1; shift
  local version out rc
  for version in $k8s_versions; do
    rc=0
    out=$("$kv" --strict --quiet -k "$version" "$@" 2>&1) || rc=$?
    [[ -n $out ]] && echo "$out"
    if [[ $rc -ne 0 ]]; then
      fail "$label: schema validation against Kubernetes $version"
    elif grep -q '^WARN' <<<"$out"; then
      fail "$label: kubernetes-validate could not check everything against Kubernetes $version"
    else
      echo "ok   $label: valid against Kubernetes $version (strict)"
    fi
  done
}

# ---------------------------------------------------------------- 1. Kubernetes objects
echo "== Kubernetes manifests ($k8s_dir)"
manifests=()
for f in "$k8s_dir"/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done
[[ ${#manifests[@]} -gt 0 ]] || fail "no manifests found in $k8s_dir"
[[ ${#manifests[@]} -gt 0 ]] && validate "$k8s_dir (${#manifests[@]} files)" "${manifests[@]}"

# ---------------------------------------------------------------- 2. kustomization
echo "== $k8s_dir/kustomization.yaml"
if "$py" - "$k8s_dir" <<'PY'; then echo "ok   kustomization: lists exactly the manifests"; else fail "kustomization: resource list"; fi
import os, sys, yaml
d = sys.argv[1]
with open(os.path.join(d, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
errors = []
if not isinstance(k, dict) or k.get("kind") != "Kustomization" \
        or not str(k.get("apiVersion", "")).startswith("kustomize.config.k8s.io/"):
    errors.append("not a kustomize.config.k8s.io Kustomization")
    k = k if isinstance(k, dict) else {}
listed = k.get("resources") or []
for r in listed:
    if not os.path.isfile(os.path.join(d, r)):
        errors.append(f"lists {r}, which does not exist")
# The example Secret stays out on purpose: a real token must not come from the repository.
present = {f for f in os.listdir(d) if f.endswith(".yaml")} - {"kustomization.yaml", "secret.example.yaml"}
for f in sorted(present - set(listed)):
    errors.append(f"does not list {f}")
for e in errors:
    print(f"kustomization.yaml: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY
if command -v kubectl >/dev/null; then
  if kubectl kustomize "$k8s_dir" >"$work/kustomize-output.yaml" 2>"$work/kustomize.err"; then
    echo "ok   kustomization: kubectl kustomize renders it"
    validate "kustomize output" "$work/kustomize-output.yaml"
  else
    cat "$work/kustomize.err" >&2
    fail "kustomization: kubectl kustomize"
  fi
else
  echo "skip kubectl kustomize (kubectl not installed)"
fi

# ---------------------------------------------------------------- 3. systemd unit
echo "== $unit"
if command -v systemd-analyze >/dev/null; then
  # ref-server is not installed where this runs; point ExecStart at a stub so that verify
  # checks everything else. verify exits 0 on unknown keys and bad values (it only warns),
  # so any output is a failure.
  exe=$(sed -n 's/^ExecStart=[-@:+!]*\([^ ]*\).*/\1/p' "$unit" | head -n1)
  printf '#!/bin/sh\nexit 0\n' >"$work/ref-server" && chmod +x "$work/ref-server"
  sed "s|^ExecStart=\([-@:+!]*\)$exe|ExecStart=\1$work/ref-server|" "$unit" >"$work/ref-server.service"
  rc=0
  out=$(systemd-analyze verify "$work/ref-server.service" 2>&1) || rc=$?
  if [[ $rc -ne 0 || -n $out ]]; then
    echo "${out//$work\//$(dirname "$unit")/}" >&2
    fail "systemd-analyze verify $unit"
  else
    echo "ok   systemd-analyze verify (ExecStart binary $exe stubbed)"
  fi
else
  echo "skip systemd-analyze verify (systemd-analyze not installed); the lint below still runs"
fi
if "$py" - "$unit" <<'PY'; then echo "ok   unit lint"; else fail "unit lint: $unit"; fi
# What this project requires of the unit (systemd-analyze checks syntax, not intent).
import re, sys
path = sys.argv[1]
sections, cur, errors = {}, None, []
lines = open(path).read().replace("\\\n", " ").splitlines()
for n, line in enumerate(lines, 1):
    s = line.strip()
    if not s or s[0] in "#;":
        continue
    if re.fullmatch(r"\[[A-Za-z]+\]", s):
        cur = sections.setdefault(s[1:-1], {})
    elif "=" in s and cur is not None:
        key, val = s.split("=", 1)
        cur.setdefault(key.strip(), []).append(val.strip())
    else:
        errors.append(f"line {n}: not a section header or Key=value: {s!r}")
def get(sec, key):
    return sections.get(sec, {}).get(key, [])
for sec in ("Unit", "Service", "Install"):
    if sec not in sections:
        errors.append(f"missing [{sec}]")
for key in ("Description",):
    if not get("Unit", key):
        errors.append(f"[Unit] needs {key}=")
exec_start = " ".join(get("Service", "ExecStart"))
if not re.match(r"[-@:+!]*/", exec_start):
    errors.append("[Service] ExecStart= must start with an absolute path")
for flag in ("serve", "--model", "--listen", "--auth-token-file"):
    if flag not in exec_start.split():
        errors.append(f"ExecStart= lacks {flag}")
if get("Service", "Restart") != ["on-failure"]:
    errors.append("[Service] needs Restart=on-failure")
if get("Service", "KillSignal") != ["SIGTERM"]:
    errors.append("[Service] needs KillSignal=SIGTERM (the server drains on it)")
if not get("Service", "TimeoutStopSec"):
    errors.append("[Service] needs TimeoutStopSec=")
if get("Service", "DynamicUser") != ["yes"] and not get("Service", "User"):
    errors.append("[Service] must not run as root: DynamicUser=yes or User=")
if not get("Service", "LoadCredential") and not get("Service", "EnvironmentFile"):
    errors.append("[Service] needs LoadCredential= (or EnvironmentFile=) for the token")
for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"):
    if not get("Service", key):
        errors.append(f"[Service] hardening: {key}= missing")
if not get("Install", "WantedBy"):
    errors.append("[Install] needs WantedBy=")
for e in errors:
    print(f"{path}: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

# ---------------------------------------------------------------- verdict
if [[ ${#failures[@]} -gt 0 ]]; then
  echo "validate-manifests: ${#failures[@]} check(s) failed:" >&2
  printf '  - %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "validate-manifests: all checks passed"
