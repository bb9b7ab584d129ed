"""Goldens for the spelling tasks: run nanochat's own tasks/spellingbee.py on a 10-word list.

    python3 make_spelling_goldens.py /path/to/nanochat > spelling_goldens.json

`nanochat.common` is stubbed (it imports torch and downloads the word list); only its
`download_file_with_lock` is used, and it is pointed at the small list written here.
"""
import json
import os
import sys
import tempfile
import types

WORDS = ["apple", "banana", "strawberry", "mississippi", "kiwi", "rhythm", "bookkeeper", "queue", "a", "zebra"]

ref = sys.argv[1]
sys.path.insert(0, ref)
words_path = os.path.join(tempfile.mkdtemp(), "words.txt")
with open(words_path, "w") as f:
    f.write("\n".join(WORDS) + "\n")
stub = types.ModuleType("nanochat.common")
stub.download_file_with_lock = lambda url, filename: words_path
import nanochat  # noqa: E402  (the package itself imports nothing heavy)
sys.modules["nanochat.common"] = stub
from tasks.spellingbee import SimpleSpelling, SpellingBee  # noqa: E402

out = {"words": WORDS}
for split in ["train", "test"]:
    bee = SpellingBee(size=12, split=split)
    out["bee_" + split] = [bee[i]["messages"] for i in range(12)]
    simple = SimpleSpelling(size=5, split=split)
    out["simple_" + split] = [simple[i]["messages"] for i in range(5)]
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
print()
