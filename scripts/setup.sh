#!/usr/bin/env bash
# scripts/setup.sh — install the external tools the tests need (the target behind `make setup`).
#
# Tools (each ends up in .tools/bin):
#   restic       restic >= 0.17: Debian trixie's package (bookworm only has 0.14)
#   pushgateway  Prometheus pushgateway: Debian trixie's prometheus-pushgateway, binary only,
#                never installed as a service (also available as prometheus-pushgateway)
#   garage       Garage S3 server, built from crates.io with cargo (slow: 15-30 minutes once)
#   kubectl      the kubectl already on PATH if it works, else Debian trixie's kubectl package
#   helm         helm-python-sdk (Helm v4's Go SDK as libhelm_c.so, used through ctypes) with
#                pyyaml and pytest, in a venv; run it as .tools/bin/python-helm, and
#                .tools/bin/helm: the helm command line on that engine (tests/cluster-sim/helm.py)
#
# Where things go: a per-user cache outside the checkout, so every clone on the machine shares
# one install and `git clean` does not throw away a 30-minute garage build:
#   ${STASH_TOOLS_CACHE:-$HOME/.cache/stash-tools}   the cache; its bin/ holds the tools
#   <repo>/.tools                                      symlink to the cache (git-ignored)
# If <repo>/.tools is a real directory, it is used as the cache instead and left in place.
#
# Every step first checks for what is already installed, so a second run takes about a second
# and needs no network. Debian packages are fetched with a PRIVATE apt configuration kept in the
# cache (own sources.list, lists and archive cache): the system's apt setup is never touched and
# nothing is installed system-wide. The Debian mirror is taken from the system's apt sources.
#
# Environment:
#   STASH_TOOLS_CACHE    cache directory (default $HOME/.cache/stash-tools)
#   STASH_SETUP_SKIP     comma-separated tools not to install or check, e.g. "garage" or
#                        "garage,helm" (names as in the list above)
#   STASH_DEBIAN_MIRROR  Debian mirror URI to use instead of the one in the apt sources
#   STASH_PYTHON         Python used to create the helm venv (default python3)
#
# Output: progress on stderr; on stdout one line per tool with its version, e.g.
# "restic 0.18.0". Exits non-zero, naming the tools, if any tool failed.

set -euo pipefail
# Command substitutions ($(fetch_deb ...)) must stop at the first failing command too.
shopt -s inherit_errexit

# Pinned versions and sources: change them here.
readonly RESTIC_MIN_VERSION=0.17
readonly GARAGE_VERSION=2.5.0
readonly GARAGE_FEATURES=bundled-libs,sqlite
readonly HELM_PY_SDK_VERSION=0.2.2
readonly DEBIAN_SUITE=trixie
readonly DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly TOOLS=(restic pushgateway garage kubectl helm)

log() { printf 'setup: %s\n' "$*" >&2; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    # Tell the ERR trap of the enclosing step that the failure has been explained already.
    if [[ -n ${WORK:-} ]]; then : >"$WORK/.error-reported"; fi
    exit 1
}

# STASH_SETUP_SKIP, checked (before anything is touched) against the known names, so a typo
# does not silently skip nothing.
SKIP=",$(tr -d '[:space:]' <<<"${STASH_SETUP_SKIP:-}"),"
IFS=, read -ra skip_list <<<"${SKIP//,,/,}"
for s in "${skip_list[@]}"; do
    [[ -z $s || " ${TOOLS[*]} " == *" $s "* ]] \
        || die "STASH_SETUP_SKIP: unknown tool '$s' (known: ${TOOLS[*]})"
done
skipped() { [[ $SKIP == *",$1,"* ]]; }

# ---------------------------------------------------------------------------------------------
# Cache location and the .tools link
# ---------------------------------------------------------------------------------------------

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
LINK=$REPO_ROOT/.tools

if [[ -d $LINK && ! -L $LINK ]]; then
    # Someone chose a real directory: respect it and install into it.
    CACHE=$LINK
else
    CACHE=${STASH_TOOLS_CACHE:-${HOME:?HOME is not set; set STASH_TOOLS_CACHE}/.cache/stash-tools}
    mkdir -p "$CACHE"
    CACHE=$(cd "$CACHE" && pwd -P)
    if [[ -e $LINK && ! -L $LINK && ! -d $LINK ]]; then
        die "$LINK exists and is neither a directory nor a symlink; remove it and rerun"
    fi
    # The cache may itself be <repo>/.tools (STASH_TOOLS_CACHE pointing there): then it is
    # the real directory now and needs no link. Otherwise (re)point the link; -n replaces a
    # stale or dangling symlink instead of creating a link inside the directory it points to.
    if [[ -L $LINK || ! -e $LINK ]]; then
        ln -sfn "$CACHE" "$LINK"
    fi
fi
BIN=$CACHE/bin
APT_DIR=$CACHE/apt
mkdir -p "$BIN"

if git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 \
    && ! git -C "$REPO_ROOT" check-ignore -q .tools; then
    log "warning: .tools is not git-ignored; add /.tools to .gitignore"
fi

# One setup at a time per cache: two checkouts running `make setup` together would otherwise
# race on the apt lists and the venv.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.setup.lock"
    if ! flock -n 9; then
        log "another setup is running on $CACHE; waiting for it to finish"
        flock 9
    fi
fi

# Scratch space inside the cache (same filesystem, so finished files can be mv'ed into place
# atomically). With the lock held, any older scratch directory is from a run that was killed.
rm -rf "$CACHE"/.tmp.*
WORK=$(mktemp -d "$CACHE/.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

# version_ge A B: is version A >= version B?
version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

# Replace DEST with an executable copy of SRC atomically (mv -T also replaces a symlink that
# points to a directory instead of moving into it).
install_exe() {
    install -m 0755 "$1" "$2.new"
    mv -fT "$2.new" "$2"
}

# The first NAME on PATH that is not one of ours (the cache's bin may itself be on PATH, and
# linking our own symlink to itself would make a loop).
find_foreign() {
    local name=$1 dir real
    local -a dirs
    IFS=: read -ra dirs <<<"${PATH:-}"
    for dir in "${dirs[@]}"; do
        [[ -n $dir && -x $dir/$name && ! -d $dir/$name ]] || continue
        # Skip our own bin directory, however it is reached (`make` puts .tools/bin first
        # on PATH): linking to it would make the link point at itself.
        [[ $(readlink -f "$dir") == "$CACHE"/* ]] && continue
        real=$(readlink -f "$dir/$name") || continue
        [[ $real == "$CACHE"/* ]] && continue
        printf '%s\n' "$dir/$name"
        return 0
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# Private apt: Debian trixie packages, downloaded and unpacked, never installed
# ---------------------------------------------------------------------------------------------

# The Debian mirror the system already uses. Host names are never written here: the machine's
# apt configuration knows which mirror it can reach.
debian_mirror() {
    local uri=""
    if [[ -n ${STASH_DEBIAN_MIRROR:-} ]]; then
        uri=$STASH_DEBIAN_MIRROR
    fi
    # deb822 format: the first URIs: line (skipping the security archive, which has no trixie
    # main suite; the first line is normally the main archive anyway).
    if [[ -z $uri && -r /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk 'tolower($1) == "uris:" && $2 !~ /-security\/?$/ { print $2; exit }' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    # One-line format: "deb [options] URI SUITE COMPONENTS..."; options may span fields.
    if [[ -z $uri && -r /etc/apt/sources.list ]]; then
        uri=$(awk '$1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($i !~ /-security\/?$/ && $(i + 1) !~ /-security$/) { print $i; exit }
            }' /etc/apt/sources.list)
    fi
    [[ -n $uri ]] || return 1
    printf '%s\n' "${uri%/}"
}

APT_OPTS=()
# Set up the private apt configuration (once per run, only when a package must be fetched).
apt_setup() {
    [[ ${#APT_OPTS[@]} -eq 0 ]] || return 0
    command -v apt-get >/dev/null || die "apt-get not found (a Debian system is required)"
    command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
    [[ -r $DEBIAN_KEYRING ]] \
        || die "$DEBIAN_KEYRING missing; install it with: apt-get install debian-archive-keyring"
    local mirror
    mirror=$(debian_mirror) \
        || die "cannot find a Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set STASH_DEBIAN_MIRROR"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/debs"
    local want="deb [signed-by=$DEBIAN_KEYRING] $mirror $DEBIAN_SUITE main"
    if [[ ! -f $APT_DIR/sources.list || $(<"$APT_DIR/sources.list") != "$want" ]]; then
        printf '%s\n' "$want" >"$APT_DIR/sources.list"
        # The lists on disk are for another source now: force an update.
        rm -f "$APT_DIR"/lists/*_Packages*
    fi
    APT_OPTS=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        # System pinning (e.g. for third-party repos) must not steer our choice.
        -o Dir::Etc::Preferences=/dev/null
        -o Dir::Etc::PreferencesParts=/dev/null
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::Cache=$APT_DIR/cache"
        # Pretend nothing is installed: otherwise an installed package with a higher version
        # (e.g. Google's kubectl 1:528.0.0) becomes the candidate and cannot be downloaded.
        -o Dir::State::status=/dev/null
        # Download as the current user (the cache is ours, not _apt's): no sandbox warnings.
        -o "APT::Sandbox::User=$(id -un)"
        # Only the Packages index is needed: skip translations and AppStream metadata.
        -o Acquire::Languages=none
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
    )
}

# Refresh the private package lists, at most once per run.
apt_update() {
    [[ -e $WORK/apt-updated ]] && return 0
    [[ -e $WORK/apt-update-failed ]] \
        && die "the private apt lists could not be updated (see the first error above)"
    local source
    source=$(<"$APT_DIR/sources.list")
    log "updating the private apt lists for Debian $DEBIAN_SUITE"
    # apt-get update exits 0 even when every fetch failed, so also check that a Packages
    # index arrived.
    if ! apt-get "${APT_OPTS[@]}" -q update >"$WORK/apt-update.log" 2>&1 \
        || ! compgen -G "$APT_DIR/lists/*_Packages*" >/dev/null; then
        : >"$WORK/apt-update-failed"
        cat "$WORK/apt-update.log" >&2
        die "apt-get update failed for the private source '$source' (is the mirror reachable?)"
    fi
    : >"$WORK/apt-updated"
}

# The newest cached .deb of PACKAGE, if any.
cached_deb() {
    local f
    for f in "$APT_DIR/debs/$1"_*.deb; do
        if [[ -f $f ]]; then printf '%s\n' "$f"; fi
    done | sort -V | tail -n1
}

# fetch_deb PACKAGE: print the path of its .deb, downloading it only when none is cached.
fetch_deb() {
    local pkg=$1 deb
    deb=$(cached_deb "$pkg")
    if [[ -n $deb ]]; then
        printf '%s\n' "$deb"
        return 0
    fi
    apt_setup
    # Use the lists from an earlier run if there are any; update only when they are missing
    # or too old to know the package version the mirror has now.
    compgen -G "$APT_DIR/lists/*_Packages*" >/dev/null || apt_update
    local dl
    dl=$(mktemp -d "$WORK/dl.XXXXXX")
    log "downloading $pkg from Debian $DEBIAN_SUITE"
    if ! (cd "$dl" && apt-get "${APT_OPTS[@]}" -q download "$pkg") >"$dl.log" 2>&1; then
        apt_update
        (cd "$dl" && apt-get "${APT_OPTS[@]}" -q download "$pkg") >"$dl.log" 2>&1 \
            || { cat "$dl.log" >&2; die "apt-get download $pkg failed"; }
    fi
    # apt has checked the hash; only now does the file enter the cache (a killed download
    # never leaves a truncated .deb there).
    for deb in "$dl"/*.deb; do
        mv -f "$deb" "$APT_DIR/debs/"
    done
    deb=$(cached_deb "$pkg")
    [[ -n $deb ]] || die "apt-get download $pkg produced no $pkg .deb"
    printf '%s\n' "$deb"
}

# unpack_exe DEB MEMBER DEST: install the executable MEMBER (e.g. usr/bin/restic) of DEB as DEST.
unpack_exe() {
    local deb=$1 member=$2 dest=$3 x
    x=$(mktemp -d "$WORK/x.XXXXXX")
    if ! dpkg-deb -x "$deb" "$x"; then
        rm -f "$deb"
        die "cannot unpack $deb (removed it from the cache; rerun to download it again)"
    fi
    [[ -f $x/$member ]] || die "$deb has no $member"
    install_exe "$x/$member" "$dest"
    rm -rf "$x"
}

# ---------------------------------------------------------------------------------------------
# Version probes: print a tool's version, fail if it does not run
# ---------------------------------------------------------------------------------------------

restic_version() { "$BIN/restic" version 2>/dev/null | awk '$1 == "restic" { print $2; exit }' | grep .; }
pushgateway_version() {
    "$BIN/prometheus-pushgateway" --version 2>&1 | awk '/version/ { print $3; exit }' | grep .
}
# A crates.io build reports "garage cargo:2.5.0 [features: ...]".
garage_version() {
    "$BIN/garage" --version 2>/dev/null | awk '{ sub(/^cargo:/, "", $2); print $2; exit }' | grep .
}
kubectl_version() {
    "$BIN/kubectl" version --client 2>/dev/null | awk '/^Client Version:/ { print $3; exit }' | grep .
}
# "<package version> <Helm SDK version>"; also checks that the native library loads and that
# the packages the chart tests use are present.
helm_version() {
    "$BIN/python-helm" - 2>/dev/null <<'EOF'
import importlib.metadata as md
import helm_python as h
md.version("PyYAML"), md.version("pytest")
print(md.version("helm-python-sdk"), h.helm_sdk_version())
EOF
}

# ---------------------------------------------------------------------------------------------
# Install steps: each returns at once when its tool is already there
# ---------------------------------------------------------------------------------------------

restic_ok() {
    local v
    v=$(restic_version) && version_ge "$v" "$RESTIC_MIN_VERSION"
}
step_restic() {
    restic_ok && return 0
    local deb v
    deb=$(fetch_deb restic)
    unpack_exe "$deb" usr/bin/restic "$BIN/restic"
    v=$(restic_version) || die "the installed restic does not run"
    version_ge "$v" "$RESTIC_MIN_VERSION" \
        || die "restic $v from Debian $DEBIAN_SUITE is older than the required $RESTIC_MIN_VERSION"
}

step_pushgateway() {
    if ! pushgateway_version >/dev/null; then
        local deb
        deb=$(fetch_deb prometheus-pushgateway)
        unpack_exe "$deb" usr/bin/prometheus-pushgateway "$BIN/prometheus-pushgateway"
        pushgateway_version >/dev/null || die "the installed prometheus-pushgateway does not run"
    fi
    ln -sfn prometheus-pushgateway "$BIN/pushgateway"
}

step_garage() {
    local root=$CACHE/garage-$GARAGE_VERSION
    if [[ ! -x $root/bin/garage ]]; then
        command -v cargo >/dev/null || die "cargo not found; install Rust (rustup) first"
        local buildlog=$CACHE/build/garage-$GARAGE_VERSION.log
        mkdir -p "$CACHE/build"
        log "building garage $GARAGE_VERSION with cargo; this takes a long time (15-30 minutes," \
            "once per machine); log: $buildlog"
        # The build directory is kept in the cache so an interrupted build resumes; cargo
        # installs the binary only when the build has succeeded.
        if ! cargo install --locked garage --version "$GARAGE_VERSION" \
            --no-default-features --features "$GARAGE_FEATURES" \
            --root "$root" --target-dir "$CACHE/build/garage" >"$buildlog" 2>&1; then
            tail -n 30 "$buildlog" >&2
            die "building garage failed (full log: $buildlog)"
        fi
    fi
    ln -sfn "../garage-$GARAGE_VERSION/bin/garage" "$BIN/garage"
    garage_version >/dev/null || die "$root/bin/garage does not run"
}

step_kubectl() {
    local found
    # A working kubectl on PATH wins: it is what the user drives clusters with.
    if found=$(find_foreign kubectl) && "$found" version --client >/dev/null 2>&1; then
        # Google Cloud SDK's kubectl is a dispatcher: for every command it asks the server for
        # its version, then starts the matching kubectl.1.<minor> installed beside it, two
        # processes and a request where kubectl is one. The newest of those is linked instead.
        local real newest
        real=$(readlink -f "$found")
        if "$found" version --client 2>/dev/null | grep -q -- '-dispatcher'; then
            newest=$(find "$(dirname "$real")" -maxdepth 1 -name 'kubectl.1.*' -perm -u+x \
                | sort -V | tail -n 1)
            if [[ -n $newest ]] && "$newest" version --client >/dev/null 2>&1; then
                found=$newest
            fi
        fi
        ln -sfn "$found" "$BIN/kubectl"
        return 0
    fi
    # Otherwise keep a Debian kubectl unpacked by an earlier run (a real file, not a link to a
    # kubectl that has since gone away).
    if [[ -f $BIN/kubectl && ! -L $BIN/kubectl ]] && kubectl_version >/dev/null; then
        return 0
    fi
    # Debian's kubernetes-client is only a transitional package for this one.
    local deb
    deb=$(fetch_deb kubectl)
    unpack_exe "$deb" usr/bin/kubectl "$BIN/kubectl"
    kubectl_version >/dev/null || die "the installed kubectl does not run"
}

step_helm() {
    local venv=$CACHE/helm-venv
    # A plain symlink to the venv's python would not work: Python finds the venv by looking
    # for pyvenv.cfg next to the path it was started as, and .tools/bin has none. So
    # python-helm is a tiny wrapper that execs the venv's python (found relative to the
    # wrapper, so it survives the cache being reached through .tools).
    # shellcheck disable=SC2016  # the $ expressions belong to the wrapper
    local wrapper='#!/bin/sh
# Written by scripts/setup.sh: the Python of the helm venv (helm-python-sdk, pyyaml, pytest).
here=$(dirname "$(readlink -f "$0")")
exec "$here/../helm-venv/bin/python" "$@"'
    if [[ ! -f $BIN/python-helm || -L $BIN/python-helm || $(<"$BIN/python-helm") != "$wrapper" ]]; then
        printf '%s\n' "$wrapper" >"$WORK/python-helm"
        install_exe "$WORK/python-helm" "$BIN/python-helm"
    fi
    # `helm` itself: the command-line front end kept in the checkout, copied into the cache
    # (the cache outlives checkouts), run by python-helm.
    local cli=$REPO_ROOT/tests/cluster-sim/helm.py
    if [[ ! -f $CACHE/helm-cli.py ]] || ! cmp -s "$cli" "$CACHE/helm-cli.py"; then
        install -m 0644 "$cli" "$WORK/helm-cli.py"
        mv -f "$WORK/helm-cli.py" "$CACHE/helm-cli.py"
    fi
    # shellcheck disable=SC2016  # the $ expressions belong to the wrapper
    local helm_wrapper='#!/bin/sh
# Written by scripts/setup.sh: helm on Helm'"'"'s own engine (helm-python-sdk).
here=$(dirname "$(readlink -f "$0")")
exec "$here/python-helm" "$here/../helm-cli.py" "$@"'
    if [[ ! -f $BIN/helm || -L $BIN/helm || $(<"$BIN/helm") != "$helm_wrapper" ]]; then
        printf '%s\n' "$helm_wrapper" >"$WORK/helm"
        install_exe "$WORK/helm" "$BIN/helm"
    fi

    local v
    if v=$(helm_version) && [[ ${v%% *} == "$HELM_PY_SDK_VERSION" ]]; then
        return 0
    fi
    # A venv whose python no longer runs (its base interpreter was removed or upgraded) cannot
    # be repaired: start again.
    if ! "$venv/bin/python" -c '' 2>/dev/null; then
        local python=${STASH_PYTHON:-python3}
        command -v "$python" >/dev/null || die "$python not found"
        rm -rf "$venv"
        log "creating the helm venv with $python"
        "$python" -m venv "$venv" \
            || die "'$python -m venv' failed (on Debian: apt-get install python3-venv)"
    fi
    log "installing helm-python-sdk $HELM_PY_SDK_VERSION, pyyaml and pytest into the helm venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "helm-python-sdk==$HELM_PY_SDK_VERSION" pyyaml pytest \
        || die "pip install into $venv failed"
    v=$(helm_version) || die "helm_python does not load in $venv"
    [[ ${v%% *} == "$HELM_PY_SDK_VERSION" ]] \
        || die "the helm venv has helm-python-sdk ${v%% *}, expected $HELM_PY_SDK_VERSION"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

if [[ $CACHE == "$LINK" ]]; then
    log "tools cache: $CACHE (the checkout's own directory)"
else
    log "tools cache: $CACHE (linked as $LINK)"
fi
declare -A STATUS=()
FAILED=()
for tool in "${TOOLS[@]}"; do
    if skipped "$tool"; then
        STATUS[$tool]=skipped
        continue
    fi
    # Each step runs in its own subshell with errexit on, so a failing command ends that step
    # (and names itself) while the other tools still get installed. `set -e` would be ignored
    # inside a function called from an `if`, hence the explicit set +e / $? dance.
    # The ERR trap names the failing command once: the innermost failure reports it, and the
    # command substitutions it fails through stay quiet.
    rm -f "$WORK/.error-reported"
    set +e
    (
        set -eE
        trap 'rc=$?; if [[ ! -e $WORK/.error-reported ]]; then
                  log "$tool: command failed (exit $rc): $BASH_COMMAND"; : >"$WORK/.error-reported"
              fi' ERR
        "step_$tool"
    )
    rc=$?
    set -e
    if ((rc == 0)); then
        STATUS[$tool]=ok
    else
        STATUS[$tool]=failed
        FAILED+=("$tool")
    fi
done

# The report: one line per tool, from the installed binaries themselves.
for tool in "${TOOLS[@]}"; do
    case ${STATUS[$tool]} in
        skipped) echo "$tool skipped (STASH_SETUP_SKIP)"; continue ;;
        failed) echo "$tool FAILED"; continue ;;
    esac
    case $tool in
        restic) echo "restic $(restic_version)" ;;
        pushgateway) echo "pushgateway $(pushgateway_version)" ;;
        garage) echo "garage $(garage_version)" ;;
        kubectl)
            if [[ -L $BIN/kubectl ]]; then
                echo "kubectl $(kubectl_version) ($(readlink "$BIN/kubectl"))"
            else
                echo "kubectl $(kubectl_version) (Debian $DEBIAN_SUITE)"
            fi
            ;;
        helm)
            read -r pkg sdk <<<"$(helm_version)"
            echo "helm-python-sdk $pkg (Helm SDK $sdk)"
            ;;
    esac
done

if ((${#FAILED[@]})); then
    die "setup failed for: ${FAILED[*]} (see the messages above)"
fi
