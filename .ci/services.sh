#!/usr/bin/env bash
# Services the test-suite needs (started fresh on every CI machine).
set -euo pipefail
command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl >/dev/null; }
