-- The tables the frontend reads and writes. The frontend's contract:
--   * insert a `messages` row with role 'user', message_type 'image', content = the prompt,
--     options = {size, quality, background, output_format} (all optional);
--   * subscribe to `messages` rows with reply_to = that row's id: exactly one assistant row
--     appears ('generating'), then ends 'complete' (image_url) or 'failed' (error).

create table public.chats (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  title text,
  created_at timestamptz not null default now()
);

create index chats_user_id_idx on public.chats (user_id);

create table public.messages (
  id uuid primary key default gen_random_uuid(),
  chat_id uuid not null references public.chats (id) on delete cascade,
  role text not null,
  content text not null,
  message_type text not null default 'text',
  image_url text,
  status text,
  error text,
  reply_to uuid references public.messages (id) on delete cascade,
  options jsonb not null default '{}'::jsonb,
  metadata jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  -- Backstops; the validation trigger below raises clearer messages first.
  constraint messages_role_check check (role in ('user', 'assistant', 'system')),
  constraint messages_message_type_check check (message_type in ('text', 'image')),
  constraint messages_status_check check (status in ('generating', 'complete', 'failed')),
  constraint messages_options_object_check check (jsonb_typeof(options) = 'object'),
  constraint messages_metadata_object_check check (jsonb_typeof(metadata) = 'object'),
  constraint messages_reply_shape_check check (
    reply_to is null or (role = 'assistant' and status is not null)
  )
);

-- Exactly one reply per request: a second worker's insert collides here.
create unique index messages_one_reply_per_request on public.messages (reply_to)
  where reply_to is not null;
create index messages_chat_id_created_at_idx on public.messages (chat_id, created_at);

-- Rejects a bad request at insert time with a message PostgREST hands to the frontend (HTTP 400).
create function public.messages_validate() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  prompt_length integer;
  allowed_keys constant text[] := array['size', 'quality', 'background', 'output_format'];
  extra_keys text[];
  opt_value jsonb;
  width integer;
  height integer;
begin
  if new.role is null or new.role not in ('user', 'assistant', 'system') then
    raise exception 'role must be one of user, assistant, system (got %)',
      coalesce(quote_literal(left(new.role, 40)), 'null')
      using errcode = 'check_violation';
  end if;
  if new.message_type is null or new.message_type not in ('text', 'image') then
    raise exception 'message_type must be ''text'' or ''image'' in lower case (got %)',
      coalesce(quote_literal(left(new.message_type, 40)), 'null')
      using errcode = 'check_violation';
  end if;
  if new.options is null or jsonb_typeof(new.options) <> 'object' then
    raise exception 'options must be a JSON object'
      using errcode = 'check_violation';
  end if;

  if new.role = 'user' and new.message_type = 'image' then
    -- Trim exactly what Python's str.strip() trims (core/validation.py): \s would depend on the
    -- database's locale (under LC_CTYPE C it misses U+3000, U+00A0, U+2000..U+200A, ...).
    prompt_length := char_length(regexp_replace(new.content,
      '^[\t\n\v\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+'
      '|[\t\n\v\f\r\u001c-\u001f \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$',
      '', 'g'));
    if prompt_length = 0 then
      raise exception 'the image prompt is empty'
        using errcode = 'check_violation', hint = 'Put the prompt in content.';
    end if;
    if prompt_length > 32000 then
      raise exception 'the image prompt is too long: % characters, the limit is 32000', prompt_length
        using errcode = 'check_violation';
    end if;

    select array_agg(k order by k) into extra_keys
    from jsonb_object_keys(new.options) as k
    where k <> all (allowed_keys);
    if extra_keys is not null then
      raise exception 'unknown image option(s): %; allowed: size, quality, background, output_format',
        left(array_to_string(extra_keys, ', '), 200)
        using errcode = 'check_violation';
    end if;

    opt_value := new.options -> 'size';
    if opt_value is not null then
      if jsonb_typeof(opt_value) <> 'string'
         or (opt_value #>> '{}' <> 'auto' and opt_value #>> '{}' !~ '^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$') then
        raise exception 'option size must be "auto" or "WIDTHxHEIGHT" such as "1024x1024"'
          using errcode = 'check_violation';
      end if;
      if opt_value #>> '{}' <> 'auto' then
        width := split_part(opt_value #>> '{}', 'x', 1)::integer;
        height := split_part(opt_value #>> '{}', 'x', 2)::integer;
        if width % 16 <> 0 or height % 16 <> 0 then
          raise exception 'option size %: width and height must be multiples of 16', opt_value #>> '{}'
            using errcode = 'check_violation';
        end if;
        if greatest(width, height) > 3840 or width * height > 3840 * 2160 then
          raise exception 'option size %: at most 3840 pixels a side and 3840x2160 in all', opt_value #>> '{}'
            using errcode = 'check_violation';
        end if;
        if greatest(width, height) > 3 * least(width, height) then
          raise exception 'option size %: the aspect ratio must be between 1:3 and 3:1', opt_value #>> '{}'
            using errcode = 'check_violation';
        end if;
      end if;
    end if;

    opt_value := new.options -> 'quality';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'string'
       or opt_value #>> '{}' not in ('low', 'medium', 'high', 'auto')) then
      raise exception 'option quality must be one of low, medium, high, auto'
        using errcode = 'check_violation';
    end if;

    opt_value := new.options -> 'background';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'string'
       or opt_value #>> '{}' not in ('transparent', 'opaque', 'auto')) then
      raise exception 'option background must be one of transparent, opaque, auto'
        using errcode = 'check_violation';
    end if;

    opt_value := new.options -> 'output_format';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'string'
       or opt_value #>> '{}' not in ('png', 'jpeg', 'webp')) then
      raise exception 'option output_format must be one of png, jpeg, webp'
        using errcode = 'check_violation';
    end if;

    if new.options ->> 'background' = 'transparent' and new.options ->> 'output_format' = 'jpeg' then
      raise exception 'a transparent background needs output_format png or webp'
        using errcode = 'check_violation';
    end if;
  elsif new.options <> '{}'::jsonb and new.role = 'user' then
    raise exception 'options are only allowed on image requests (message_type ''image'')'
      using errcode = 'check_violation';
  end if;
  return new;
end
$$;

create trigger messages_validate
  before insert or update on public.messages
  for each row execute function public.messages_validate();

create function public.messages_touch_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger messages_touch_updated_at
  before update on public.messages
  for each row execute function public.messages_touch_updated_at();

-- Row-level security: users see and write only their own chats; assistant rows are the
-- service role's alone (it bypasses RLS); anon gets nothing.
alter table public.chats enable row level security;
alter table public.messages enable row level security;

create policy chats_owner_select on public.chats
  for select to authenticated using (user_id = (select auth.uid()));
create policy chats_owner_insert on public.chats
  for insert to authenticated with check (user_id = (select auth.uid()));
create policy chats_owner_update on public.chats
  for update to authenticated
  using (user_id = (select auth.uid())) with check (user_id = (select auth.uid()));
create policy chats_owner_delete on public.chats
  for delete to authenticated using (user_id = (select auth.uid()));

create function public.is_chat_owner(p_chat_id uuid) returns boolean
language sql stable
security definer
set search_path = ''
as $$
  -- Definer rights so the policy's lookup is not itself filtered (or recursed) by RLS.
  select exists (
    select 1 from public.chats c where c.id = p_chat_id and c.user_id = auth.uid()
  )
$$;

create policy messages_owner_select on public.messages
  for select to authenticated using ((select public.is_chat_owner(chat_id)));
create policy messages_owner_insert on public.messages
  for insert to authenticated with check (
    public.is_chat_owner(chat_id)
    and role = 'user'
    and image_url is null
    and status is null
    and error is null
    and reply_to is null
    and metadata = '{}'::jsonb
  );
-- Deleting one's own request cancels it (its job and reply go with it).
create policy messages_owner_delete on public.messages
  for delete to authenticated using (public.is_chat_owner(chat_id) and role = 'user');

-- Supabase's default privileges grant anon and authenticated everything on new tables and
-- functions in public: take it back by name, then grant only what the policies allow.
revoke all on public.chats, public.messages from public, anon, authenticated;
grant select, insert, delete on public.chats to authenticated;
grant update (title) on public.chats to authenticated;
grant select, insert, delete on public.messages to authenticated;
grant all on public.chats, public.messages to service_role;

revoke all on function public.messages_validate() from public, anon, authenticated;
revoke all on function public.messages_touch_updated_at() from public, anon, authenticated;
revoke all on function public.is_chat_owner(uuid) from public, anon;
grant execute on function public.is_chat_owner(uuid) to authenticated, service_role;

-- Realtime: the frontend subscribes to replies; add the table where Supabase's publication exists.
do $$
begin
  if exists (select 1 from pg_publication where pubname = 'supabase_realtime')
     and not exists (
       select 1 from pg_publication_tables
       where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = 'messages'
     ) then
    alter publication supabase_realtime add table public.messages;
  end if;
end
$$;
