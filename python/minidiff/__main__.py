from minidiff.cli import main

raise SystemExit(main())
