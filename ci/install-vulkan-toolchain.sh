#!/usr/bin/env bash
# Install what a Vulkan build of llama.cpp needs, and a Vulkan device to run it on, on Debian or Ubuntu.
#
# The device is Mesa's software rasterizer (llvmpipe, device type CPU): slow, but a real Vulkan 1.3
# implementation, so the Vulkan backend, our patches next to it and the tuner's offload plans run on any
# machine, CI included. ggml-vulkan's CMake needs the loader and headers (libvulkan-dev), glslc,
# glslangValidator (glslang-tools) and SPIRV-Headers; vulkaninfo (vulkan-tools) is how `detect` sees devices.
#
# The pinned llama.cpp needs Vulkan headers >= 1.3.261 (ggml_vk_instance_init uses VK_EXT_layer_settings,
# vk::LayerSettingEXT). Debian 12 ships 1.3.239, so when the system's headers are older, Debian 13's
# libvulkan-dev is downloaded from Debian's archive (a source list kept in a temporary directory: the
# system's apt configuration is not touched) and its headers alone are unpacked into $PREFIX/include
# (default /usr/local/include, which the compiler and CMake's FindVulkan search before /usr/include).
# The system's loader (libvulkan.so.1) stays: the loader is ABI-compatible across 1.3/1.4 headers.
# Running it again changes nothing once everything is there.
set -euo pipefail

PREFIX=${PREFIX:-/usr/local}
MIN_HEADERS=1.3.261
NEWER_SUITE=${NEWER_SUITE:-trixie}
packages=(mesa-vulkan-drivers libvulkan-dev glslc glslang-tools spirv-headers vulkan-tools)

say() { echo "install-vulkan-toolchain: $*"; }

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# "1.3.239" from a vulkan_core.h: VK_HEADER_VERSION_COMPLETE names major.minor, VK_HEADER_VERSION the patch.
header_version() {
  local header=$1/vulkan/vulkan_core.h
  [ -f "$header" ] || return 1
  local complete patch
  complete=$(sed -n 's/^#define VK_HEADER_VERSION_COMPLETE VK_MAKE_API_VERSION(0, *\([0-9]*\), *\([0-9]*\),.*/\1.\2/p' "$header")
  patch=$(sed -n 's/^#define VK_HEADER_VERSION \([0-9]*\)$/\1/p' "$header")
  [ -n "$complete" ] && [ -n "$patch" ] && echo "$complete.$patch"
}
at_least() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -1)" = "$2" ]; }

for include in "$PREFIX/include" /usr/include; do
  if version=$(header_version "$include") && at_least "$version" "$MIN_HEADERS"; then
    say "Vulkan headers $version in $include (>= $MIN_HEADERS): nothing to do"
    exit 0
  fi
done

say "Vulkan headers $(header_version /usr/include || echo absent) in /usr/include are older than $MIN_HEADERS;" \
    "installing Debian $NEWER_SUITE's libvulkan-dev headers into $PREFIX/include"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial" "$work/preferences"
cat > "$work/sources/newer.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $NEWER_SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt_options=(
  -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/sources"
  -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
  -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$work/preferences"
  -o "APT::Sandbox::User=root"
)
apt-get "${apt_options[@]}" update -qq
(cd "$work" && apt-get "${apt_options[@]}" download -qq libvulkan-dev)
dpkg-deb -x "$work"/libvulkan-dev_*.deb "$work/root"
version=$(header_version "$work/root/usr/include") || { say "the downloaded libvulkan-dev has no vulkan_core.h"; exit 1; }
at_least "$version" "$MIN_HEADERS" || { say "Debian $NEWER_SUITE's headers are $version, older than $MIN_HEADERS"; exit 1; }
mkdir -p "$PREFIX/include"
cp -r "$work/root/usr/include/." "$PREFIX/include/"
say "Vulkan headers $version installed in $PREFIX/include ($(ls "$work/root/usr/include" | tr '\n' ' '))"
