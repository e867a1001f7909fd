#!/usr/bin/env bash
# Writes OUT (default .dvc/tmp/plots-offline.html, git-ignored): DVC's own plots page with vega, vega-lite
# and vega-embed inlined instead of loaded from a CDN (which leaves `dvc plots show` blank without internet). Same versions as dvc-render's page.
# `make plots` uses it: dvc plots show --html-template OUT. Needs npm (the npm registry); the libraries are
# fetched, never committed. Their BSD-3 licence texts go to OUT.LICENSES.
set -euo pipefail
out="${1:-.dvc/tmp/plots-offline.html}"
mkdir -p "$(dirname "$out")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
packages=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
(cd "$work" && npm pack --silent "${packages[@]}" >/dev/null)
: >"$out.LICENSES"
scripts=""
for pkg in "${packages[@]}"; do
  name="${pkg%@*}"
  mkdir "$work/$name"
  tar xzf "$work/$name-${pkg#*@}.tgz" -C "$work/$name"
  printf '%s\n%s\n\n' "== $pkg (build/$name.min.js)" "$(cat "$work/$name/package/LICENSE")" >>"$out.LICENSES"
  scripts+="<script>$(cat "$work/$name/package/build/$name.min.js")</script>"$'\n'
done
# dvc-render fills {refresh_tag} and {plot_divs}; leaving out {scripts} drops its CDN <script> tags.
cat >"$out.partial" <<HTML
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- ${packages[*]}, BSD-3-Clause: see plots-offline.html.LICENSES; written by scripts/dvc_plots_offline.sh -->
$scripts
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
HTML
mv "$out.partial" "$out"
echo "offline DVC plots template: $out"
