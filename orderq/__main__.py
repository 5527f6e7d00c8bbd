from orderq.cli import main

raise SystemExit(main())
