"""The console's pages, one module per part: auth (sign-in), jobs, gallery, redo, new, spend,
schedules."""
