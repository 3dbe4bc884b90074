from hvlab.cli import main

raise SystemExit(main())
