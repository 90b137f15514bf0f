"""Fetch torch-fidelity's Inception-v3 weights (``inception-v3-compat``) to a local file, for
``submit stage=evaluate eval.features=inception eval.inception_weights=<file>``.

Run it where the internet is reachable (jobs never download); it prints the file's sha256 and checks
it against the digest prefix in the published file name.

    python tools/fetch_inception_weights.py --out /shared/weights/inception-2015-12-05.pth
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.request
from pathlib import Path

from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the weights file")
    parser.add_argument("--url", default=URL_INCEPTION_V3, help="source (default: torch-fidelity's release)")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} exists; nothing downloaded (delete it to fetch again)", file=sys.stderr)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.part{os.getpid()}")
        print(f"downloading {args.url}", file=sys.stderr)
        urllib.request.urlretrieve(args.url, tmp)
        os.replace(tmp, args.out)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"sha256 {digest}  {args.out}")
    expected = Path(args.url).stem.rsplit("-", 1)[-1]  # weights-inception-2015-12-05-6726825d
    if not digest.startswith(expected):
        print(f"warning: the published name says sha256 {expected}..., the file has {digest[:8]}...",
              file=sys.stderr)
        return 1
    print(f"pass eval.features=inception eval.inception_weights={args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
