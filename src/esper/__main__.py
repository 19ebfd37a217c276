from esper.cli import main

raise SystemExit(main())
