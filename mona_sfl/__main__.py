from mona_sfl.cli import main

raise SystemExit(main())
