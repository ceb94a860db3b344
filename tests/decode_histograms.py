#!/usr/bin/env python3
"""Decode shardproxy's /histograms with an independent HdrHistogram library.

Usage: decode_histograms.py URL
Fetches URL (e.g. http://127.0.0.1:9100/histograms), decodes every line's
V2-compressed base64 histogram with the PyPI `hdrhistogram` package, merges
them per metric and direction, and prints `METRIC DIRECTION TOTAL_COUNT MAX`
per merged histogram, plus `shards N` (distinct shard ids seen).
"""
import sys
import urllib.request

from hdrh.histogram import HdrHistogram


def main(url):
    body = urllib.request.urlopen(url, timeout=10).read().decode()
    merged, shards = {}, set()
    for line in body.splitlines():
        if not line.strip():
            continue
        metric, shard, _role, direction, b64 = line.split(" ")
        shards.add(shard)
        h = HdrHistogram.decode(b64)
        key = (metric, direction.split("=", 1)[1])
        if key in merged:
            merged[key].add(h)
        else:
            merged[key] = h
    for (metric, direction), h in sorted(merged.items()):
        print("%s %s %d %d" % (metric, direction, h.get_total_count(), h.get_max_value()))
    print("shards %d" % len(shards))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
