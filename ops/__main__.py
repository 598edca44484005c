"""`python -m ops ...`: the operator CLI, as `supabase-queue-worker ...` runs it."""

from __future__ import annotations

import sys

from ops.cli import main

sys.exit(main())
