#!/usr/bin/env bash
# Prints the URI of the Debian mirror that serves SUITE, read from apt's sources the way apt
# reads them: /etc/apt/sources.list and sources.list.d/*.list (one-line style), and
# sources.list.d/*.sources (deb822). Files with any other name (e.g. *.disabled) are ignored by
# apt (sources.list(5)), and so here. Only entries that serve SUITE itself count, so a
# third-party repository (its own suite, e.g. `nodistro` or `cloud-sdk-bookworm`) is never
# taken for the Debian mirror.
#
# usage: debian-mirror.sh SUITE [APT_ETC_DIR]   (default /etc/apt)
# Exit 0 with the URI on stdout; exit 1 with the line to add on stderr when none is found.
set -euo pipefail
suite=${1:?usage: debian-mirror.sh SUITE [APT_ETC_DIR]}
etc=${2:-/etc/apt}

files=()
[ -f "$etc/sources.list" ] && files+=("$etc/sources.list")
for f in "$etc"/sources.list.d/*.list "$etc"/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
done

uri=""
for f in "${files[@]}"; do
    case "$f" in
    *.sources)
        # deb822: stanzas separated by blank lines; `Enabled: no` turns one off.
        uri=$(awk -v want="$suite" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled != "no" && uris != "") {
                    n = split(suites, s, " ")
                    for (i = 1; i <= n; i++) if (s[i] == want) { split(uris, u, " "); print u[1]; found = 1; exit }
                }
                types = ""; suites = ""; uris = ""; enabled = ""; key = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (key == "suites") suites = suites " " $0; else if (key == "uris") uris = uris " " $0; next }
            {
                line = $0; k = tolower(substr(line, 1, index(line, ":") - 1)); v = substr(line, index(line, ":") + 1)
                gsub(/^[ \t]+|[ \t]+$/, "", v); key = k
                if (k == "types") types = v; else if (k == "suites") suites = v
                else if (k == "uris") uris = v; else if (k == "enabled") enabled = tolower(v)
            }
            END { if (!found) flush() }
        ' "$f")
        ;;
    *)
        # One-line style: deb [options] URI SUITE COMPONENT...
        uri=$(awk -v want="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == want) { print $i; exit }
            }
        ' "$f")
        ;;
    esac
    [ -n "$uri" ] && break
done

if [ -z "$uri" ]; then
    echo "no apt source in $etc serves the Debian suite '$suite'; add one, e.g. this line to $etc/sources.list.d/debian.list:" >&2
    echo "  deb http://deb.debian.org/debian $suite main" >&2
    exit 1
fi
# A trailing slash or none: the same mirror; print it without one.
echo "${uri%/}"
