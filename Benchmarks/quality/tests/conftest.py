import os
import sys

QUALITY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, QUALITY)
