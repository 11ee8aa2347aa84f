-- What a Supabase project already provides, created only where it is missing, so that the
-- same migrations apply to a hosted project (`supabase db push`) and to a plain PostgreSQL 15+.
-- Nothing here replaces an existing object: every statement is guarded by an existence check.

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    -- As on Supabase: the service role bypasses row-level security.
    create role service_role nologin noinherit bypassrls;
  end if;
end
$$;

create schema if not exists auth;

do $$
begin
  if not exists (
    select 1 from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'auth' and c.relname = 'users'
  ) then
    -- A minimal stand-in for GoTrue's table: only the columns this project reads or writes.
    create table auth.users (
      id uuid primary key default gen_random_uuid(),
      email text unique,
      created_at timestamptz not null default now()
    );
  end if;

  -- auth.uid() / auth.role() / auth.jwt() read the JWT claims PostgREST puts in
  -- `request.jwt.claims`, with the same fallback to the older per-claim settings as Supabase.
  if not exists (
    select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'auth' and p.proname = 'uid'
  ) then
    execute $fn$
      create function auth.uid() returns uuid
      language sql stable
      as $body$
        select coalesce(
          nullif(current_setting('request.jwt.claim.sub', true), ''),
          (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
        )::uuid
      $body$
    $fn$;
  end if;

  if not exists (
    select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'auth' and p.proname = 'role'
  ) then
    execute $fn$
      create function auth.role() returns text
      language sql stable
      as $body$
        select coalesce(
          nullif(current_setting('request.jwt.claim.role', true), ''),
          (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
        )::text
      $body$
    $fn$;
  end if;

  if not exists (
    select 1 from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname = 'auth' and p.proname = 'jwt'
  ) then
    execute $fn$
      create function auth.jwt() returns jsonb
      language sql stable
      as $body$
        select coalesce(
          nullif(current_setting('request.jwt.claim', true), ''),
          nullif(current_setting('request.jwt.claims', true), '')
        )::jsonb
      $body$
    $fn$;
  end if;
end
$$;

-- Supabase grants these already (and there the auth schema is not ours to grant on), so grant
-- only what is missing: on a plain PostgreSQL the policies need them to resolve auth.uid().
do $$
declare
  r text;
begin
  foreach r in array array['anon', 'authenticated', 'service_role'] loop
    if not has_schema_privilege(r, 'auth', 'usage') then
      execute format('grant usage on schema auth to %I', r);
    end if;
    if not has_function_privilege(r, 'auth.uid()', 'execute') then
      execute format('grant execute on function auth.uid(), auth.role(), auth.jwt() to %I', r);
    end if;
    if not has_schema_privilege(r, 'public', 'usage') then
      execute format('grant usage on schema public to %I', r);
    end if;
  end loop;
end
$$;
