from emsfl.cli import main

raise SystemExit(main())
