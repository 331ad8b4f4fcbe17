from emsfl.cli import main

if __name__ == "__main__":  # not when imported (multiprocessing spawn re-imports `__main__`)
    raise SystemExit(main())
