#!/bin/sh
# Builds the worker's native hashing kernel, sha512_lanes.so, from sha512_lanes.c (and .h).
#   worker/build_kernel.sh [DIR]     into DIR (default: worker/, where worker/native.py looks)
# The compiler is $CC (default cc); extra flags come from $DW_KERNEL_CFLAGS (for example
# -DDW_PORTABLE_ONLY: the scalar kernel alone, as on other architectures than x86-64).
# Exit status: 0 built or up to date, 2 no C compiler (the worker then hashes with its
# Python loop), 1 the build failed.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out_dir=${1:-$here}
source_file=$here/sha512_lanes.c
target=$out_dir/sha512_lanes.so
cc=${CC:-cc}
extra=${DW_KERNEL_CFLAGS:-}

if ! command -v "$cc" > /dev/null 2>&1; then
    echo "build_kernel: no C compiler ($cc): the worker will hash with its Python loop" >&2
    exit 2
fi
up_to_date() {
    [ -z "$extra" ] && [ -f "$target" ] || return 1
    for input in "$source_file" "$here"/sha512_lanes*.h "$0"; do
        [ "$target" -nt "$input" ] || return 1
    done
}
if up_to_date; then
    echo "build_kernel: $target is up to date"
    exit 0
fi
flags="-O2 -std=gnu11 -Wall -Wextra -shared -fPIC -fvisibility=hidden"
# The vector kernels run faster in the order the source gives their instructions: measured
# with GCC 12 on AMD Zen 4, its late scheduler cost 4 % and its reassociation of the rounds'
# sums 3 %. Other compilers may not know the flags.
for flag in -fno-schedule-insns2 -fno-tree-reassoc; do
    if "$cc" "$flag" -x c -c -o /dev/null /dev/null 2> /dev/null; then
        flags="$flags $flag"
    fi
done
mkdir -p "$out_dir"
# Built beside the target, then renamed over it: a worker that has the old library mapped
# keeps running on it, and no one ever loads a half-written file.
partial=$(mktemp "$out_dir/.sha512_lanes.XXXXXX")
trap 'rm -f "$partial"' EXIT
trap 'rm -f "$partial"; exit 1' INT TERM HUP
# shellcheck disable=SC2086  # the flags are words
if ! "$cc" $flags $extra -o "$partial" "$source_file"; then
    echo "build_kernel: $cc failed: the worker will hash with its Python loop" >&2
    exit 1
fi
chmod 0644 "$partial"
mv -f "$partial" "$target"
echo "build_kernel: built $target"
