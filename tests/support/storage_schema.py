"""A stand-in for Supabase Storage's schema, enough for the migrations' buckets and policies:
the columns and the ``storage.foldername`` function the policies use, copied from Supabase's
storage migrations (real Storage has much more)."""

STORAGE_SCHEMA = """
create schema storage;
create table storage.buckets (
  id text primary key, name text not null, public boolean default false
);
create table storage.objects (
  id uuid primary key default gen_random_uuid(),
  bucket_id text references storage.buckets (id),
  name text not null,
  owner uuid
);
create function storage.foldername(name text) returns text[] language plpgsql as $$
declare _parts text[];
begin
  select string_to_array(name, '/') into _parts;
  return _parts[1:array_length(_parts, 1) - 1];
end
$$;
alter table storage.objects enable row level security;
grant usage on schema storage to authenticated;
grant select on storage.objects to authenticated;
"""
