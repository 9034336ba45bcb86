import sys
from pathlib import Path

# differential.py sits next to the tests, not in a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
