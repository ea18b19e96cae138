#!/usr/bin/env bash
# Build the mmiosplit test guests: hello-a64, hello-a32 and hello-t32, and the
# interrupt guests timer-tick, uart-echo, sgi and fiq (each -a64 and -a32, from irq/).
#
#   guests/build.sh           build with Debian's gcc cross compilers
#                             (gcc-aarch64-linux-gnu, gcc-arm-none-eabi)
#   guests/build.sh --clang   build with clang + ld.lld + llvm-objcopy
#   guests/build.sh --check   build with gcc and fail if guests/bin differs (CI)
#
# Intermediate files (ELF, flat binary, disassembly, map) go to
# guests/build/<toolchain>/ (ignored by git); the flat binaries are copied to
# guests/bin/hello-{a64,a32,t32}.bin (committed; load at 0x40080000) and
# guests/bin/{timer-tick,uart-echo,sgi}-{a64,a32}.bin (committed; flash bank 0
# of QEMU's virt board at address 0, as with qemu -bios).
#
# Debian 12 packages: gcc-aarch64-linux-gnu gcc-arm-none-eabi
#                     (for --clang: clang lld llvm)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/hello"
bindir="$here/bin"

toolchain=gcc
check=0
case "${1:-}" in
    "") ;;
    --gcc) toolchain=gcc ;;
    --check) check=1 ;;
    --clang) toolchain=clang ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--gcc|--clang|--check]" >&2; exit 2 ;;
esac

out="$here/build/$toolchain"
mkdir -p "$out" "$bindir"

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "error: $1 not found (apt-get install -y $2)" >&2
        exit 1
    }
}

# Flags shared by every build: freestanding, no libc, no PIC, no unwind tables,
# no unaligned accesses (with the MMU off all data accesses are Device memory).
common=(
    -O2 -g -std=gnu11 -Wall -Wextra -Werror
    -ffreestanding -fno-builtin -nostdlib -nostartfiles -static
    -fno-pic -fno-pie -fno-stack-protector
    -fno-asynchronous-unwind-tables -fno-unwind-tables -fno-exceptions
    -Wl,--build-id=none -Wl,-z,noexecstack
)
a64_flags=(-mgeneral-regs-only -mstrict-align -mbranch-protection=none)
arm_flags=(-mcpu=cortex-a15 -mfloat-abi=soft -mno-unaligned-access)

if [[ $toolchain == gcc ]]; then
    need aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu
    need arm-none-eabi-gcc gcc-arm-none-eabi
    cc_a64=(aarch64-linux-gnu-gcc -no-pie)
    cc_arm=(arm-none-eabi-gcc)
    common+=(-Wl,--no-warn-rwx-segments)
    objcopy_a64=aarch64-linux-gnu-objcopy
    objcopy_arm=arm-none-eabi-objcopy
    objdump_a64=aarch64-linux-gnu-objdump
    objdump_arm=arm-none-eabi-objdump
    readelf=aarch64-linux-gnu-readelf   # any readelf reads both classes
else
    need clang clang
    need ld.lld lld
    need llvm-objcopy llvm
    cc_a64=(clang --target=aarch64-none-elf -fuse-ld=lld -Wno-unused-command-line-argument)
    cc_arm=(clang --target=armv7a-none-eabi -fuse-ld=lld -Wno-unused-command-line-argument)
    objcopy_a64=llvm-objcopy
    objcopy_arm=llvm-objcopy
    # GNU objdump gives the same listing format for both toolchains if present
    if command -v aarch64-linux-gnu-objdump >/dev/null; then objdump_a64=aarch64-linux-gnu-objdump; else objdump_a64=llvm-objdump; fi
    if command -v arm-none-eabi-objdump >/dev/null; then objdump_arm=arm-none-eabi-objdump; else objdump_arm=llvm-objdump; fi
    if command -v llvm-readelf >/dev/null; then readelf=llvm-readelf; else readelf=readelf; fi
fi

# build <name> <expected ELF entry> <objcopy> <objdump> <compiler + flags...>
build() {
    local name=$1 entry=$2 objcopy=$3 objdump=$4
    shift 4
    local elf="$out/hello-$name.elf" bin="$out/hello-$name.bin"
    local start="$src/start64.S"
    [[ $name == a64 ]] || start="$src/start32.S"

    "$@" "${common[@]}" -Wl,-T,"$src/link.ld" -Wl,-Map,"$out/hello-$name.map" \
        -o "$elf" "$start" "$src/hello.c"
    "$objcopy" -O binary "$elf" "$bin"
    "$objdump" -d "$elf" >"$out/hello-$name.dis"

    local got
    got=$("$readelf" -h "$elf" | awk '/Entry point address/ {print $NF}')
    if [[ $((got)) -ne $((entry)) ]]; then
        echo "error: $elf: entry $got, expected $entry" >&2
        exit 1
    fi
    printf '  %-18s %6d bytes  entry %s  sha256 %.16s  (%s)\n' \
        "hello-$name.bin" "$(stat -c %s "$bin")" "$entry" \
        "$(sha256sum "$bin" | cut -d' ' -f1)" "build/$toolchain/hello-$name.elf"
}

# build_irq <guest> <source> <arch> <objcopy> <objdump> <compiler + flags...>
# An interrupt guest: irq/start{64,32}.S + irq/lib.c + irq/<source>, linked at 0 (flash).
build_irq() {
    local guest=$1 source=$2 arch=$3 objcopy=$4 objdump=$5
    shift 5
    local irq="$here/irq" name="$guest-$arch"
    local elf="$out/$name.elf" bin="$out/$name.bin"
    local start="$irq/start64.S"
    [[ $arch == a64 ]] || start="$irq/start32.S"

    "$@" "${common[@]}" -Wl,-T,"$irq/link.ld" -Wl,-Map,"$out/$name.map" \
        -o "$elf" "$start" "$irq/lib.c" "$irq/$source"
    "$objcopy" -O binary "$elf" "$bin"
    "$objdump" -d "$elf" >"$out/$name.dis"

    local got
    got=$("$readelf" -h "$elf" | awk '/Entry point address/ {print $NF}')
    if [[ $((got)) -ne 0 ]]; then
        echo "error: $elf: entry $got, expected 0 (flash)" >&2
        exit 1
    fi
    printf '  %-18s %6d bytes  entry 0x0  sha256 %.16s  (%s)\n' \
        "$name.bin" "$(stat -c %s "$bin")" \
        "$(sha256sum "$bin" | cut -d' ' -f1)" "build/$toolchain/$name.elf"
}

irq_guests=(timer-tick:timer_tick.c uart-echo:uart_echo.c sgi:sgi.c fiq:fiq.c)
bins=(hello-a64 hello-a32 hello-t32)

echo "building guests with $toolchain:"
build a64 0x40080000 "$objcopy_a64" "$objdump_a64" "${cc_a64[@]}" "${a64_flags[@]}"
build a32 0x40080000 "$objcopy_arm" "$objdump_arm" "${cc_arm[@]}" "${arm_flags[@]}" -marm
build t32 0x40080001 "$objcopy_arm" "$objdump_arm" "${cc_arm[@]}" "${arm_flags[@]}" -mthumb
for g in "${irq_guests[@]}"; do
    guest=${g%%:*} source=${g#*:}
    build_irq "$guest" "$source" a64 "$objcopy_a64" "$objdump_a64" "${cc_a64[@]}" "${a64_flags[@]}"
    build_irq "$guest" "$source" a32 "$objcopy_arm" "$objdump_arm" "${cc_arm[@]}" "${arm_flags[@]}" -marm
    bins+=("$guest-a64" "$guest-a32")
done
if [ "$check" = 1 ]; then
    for name in "${bins[@]}"; do
        cmp "$out/$name.bin" "$bindir/$name.bin" || {
            echo "guests/bin/$name.bin is stale: rebuild with guests/build.sh and commit it" >&2
            exit 1
        }
    done
    echo "guests/bin matches a fresh build from source"
    exit 0
fi
# copy only after everything built, so a failed build never leaves a mix in bin/
for name in "${bins[@]}"; do
    cp "$out/$name.bin" "$bindir/$name.bin"
done
echo "copied to $bindir: ${bins[*]/%/.bin}"
echo "hello: load at 0x40080000; a64/a32 start at 0x40080000, t32 at 0x40080001 (Thumb)"
echo "timer-tick, uart-echo, sgi, fiq: flash bank 0 at address 0 (qemu -bios / mmiosplit run --machine virt)"
