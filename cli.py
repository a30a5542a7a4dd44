"""python cli.py {fit,validate,test} --config configs/tiny.yaml [--model.attention Flash ...]
   python cli.py generate --config CONFIG --ckpt_path CKPT --prompt_file FILE (hsa_lightning/inference/cli.py)"""
from hsa_lightning.cli import main

if __name__ == "__main__":
    main()
