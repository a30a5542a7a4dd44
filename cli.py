"""python cli.py {fit,validate,test} --config configs/tiny.yaml [--model.attention Flash ...]"""
from hsa_lightning.cli import main

if __name__ == "__main__":
    main()
