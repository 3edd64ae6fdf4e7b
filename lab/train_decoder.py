"""`python -m lab.train_decoder ARGS` is `python -m lab.train decoder ARGS`, kept so that the command of
decoder runs started before the trainers moved into lab/train/ still resumes them. The trainer is
lab/train/decoder.py."""
import sys

from lab.train.cli import main

if __name__ == "__main__":
    main(["decoder", *sys.argv[1:]])
