#!/usr/bin/env bash
# Builds target/debian/reuseport-cluster_VERSION-1_ARCH.deb with cargo-deb: the release
# binary, the systemd unit, the sysctl.d file, man pages and bash/zsh/fish completions. The
# man pages and completions come from the clap definitions, through the binary itself
# (`__man DIR`, `completions SHELL`), so they cannot drift from the flags.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deb-tools.sh
cargo build --release --locked --bin reuseport-cluster
bin=target/release/reuseport-cluster
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
"$bin" __man target/assets/man
gzip -9n target/assets/man/*.1
"$bin" completions bash > target/assets/completions/reuseport-cluster.bash
"$bin" completions zsh > target/assets/completions/_reuseport-cluster
"$bin" completions fish > target/assets/completions/reuseport-cluster.fish
cargo deb --no-build --locked "$@"
