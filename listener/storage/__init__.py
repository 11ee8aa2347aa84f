"""Where generated images are kept: a local directory or Supabase Storage."""
