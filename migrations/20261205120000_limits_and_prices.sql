-- Per-user limits and the cost of every image, enforced by the database.
--
-- Prices: image_queue.prices, USD per 1M tokens by model (input text, input image, output
-- image), seeded with the defaults IMAGE_LISTENER_PRICES used to hold; the operator changes
-- them with image_prices_set (`image-listener prices set`). One source: the completion prices
-- each image from it (metadata.cost_usd on the reply) and the listener's metrics read that
-- same number back.
--
-- Usage ledger: image_queue.usage, one row per accepted image request (written in the insert
-- that enqueues it) and its cost once complete. It outlives the request on purpose: deleting a
-- request or a chat must not give back the day's requests or the month's spend.
--
-- Limits: image_queue.limits holds a default row (user_id null) and per-user overrides; an
-- override replaces the default as a whole. Each limit null means unlimited; with no row (a
-- fresh database) nothing is limited. Checked in the enqueue trigger, after a per-user
-- transaction lock, so concurrent inserts of one user are counted one after the other:
--   max_pending    requests of the user not finished yet (their jobs);
--   per_day        requests accepted in the last 24 hours (rolling, from the ledger);
--   usd_per_month  spend in the current calendar month (UTC), from the ledger's costs.
-- A refused insert stores nothing. Over PostgREST the refusal is HTTP 429 with a Retry-After
-- header where the time is known (SQLSTATE 'PGRST', the way PostgREST lets SQL choose the
-- response); in SQL it is SQLSTATE IL429 with the same message.

create table image_queue.prices (
  model text primary key check (model <> '' and char_length(model) <= 200),
  input_text_usd_per_1m numeric not null check (input_text_usd_per_1m >= 0),
  input_image_usd_per_1m numeric not null check (input_image_usd_per_1m >= 0),
  output_image_usd_per_1m numeric not null check (output_image_usd_per_1m >= 0),
  updated_at timestamptz not null default now()
);

insert into image_queue.prices
  (model, input_text_usd_per_1m, input_image_usd_per_1m, output_image_usd_per_1m)
values
  ('gpt-image-2.6-flare', 5.0, 8.0, 30.0),
  ('gpt-image-2.6-sunburst', 5.0, 8.0, 30.0),
  ('gpt-image-1.5', 5.0, 8.0, 32.0),
  ('gpt-image-1-mini', 2.0, 2.5, 8.0);

create table image_queue.limits (
  -- null: the default for every user without a row of their own
  user_id uuid unique references auth.users (id) on delete cascade,
  max_pending integer check (max_pending >= 0),
  per_day integer check (per_day >= 0),
  usd_per_month numeric check (usd_per_month >= 0),
  updated_at timestamptz not null default now()
);
create unique index limits_one_default on image_queue.limits ((true)) where user_id is null;

create table image_queue.usage (
  request_id uuid primary key,  -- no foreign key: the row outlives its request
  user_id uuid not null,
  accepted_at timestamptz not null default now(),
  completed_at timestamptz,
  model text,
  input_tokens bigint,
  output_tokens bigint,
  cost_usd numeric
);
create index usage_user_accepted_idx on image_queue.usage (user_id, accepted_at);
create index usage_user_completed_idx on image_queue.usage (user_id, completed_at)
  where completed_at is not null;
create index usage_completed_idx on image_queue.usage (completed_at)
  where completed_at is not null;
-- max_pending counts a user's jobs (any state)
create index jobs_user_id_idx on image_queue.jobs (user_id);

revoke all on table image_queue.prices, image_queue.limits, image_queue.usage
  from public, anon, authenticated;

-- What one image cost: tokens x the model's prices, or null for a model without a price.
-- Input tokens count as text unless the usage splits them (input_text_tokens and
-- input_image_tokens, as the provider reports for edits).
create function image_queue.cost_usd(p_model text, p_usage jsonb) returns numeric
language sql stable
set search_path = ''
as $$
  select round((
      coalesce((p_usage ->> 'input_text_tokens')::numeric,
               (p_usage ->> 'input_tokens')::numeric
                 - coalesce((p_usage ->> 'input_image_tokens')::numeric, 0),
               0) * p.input_text_usd_per_1m
    + coalesce((p_usage ->> 'input_image_tokens')::numeric, 0) * p.input_image_usd_per_1m
    + coalesce((p_usage ->> 'output_tokens')::numeric, 0) * p.output_image_usd_per_1m
  ) / 1000000, 8)
  from image_queue.prices p
  where p.model = p_model
$$;

-- The limits that apply to a user: their override, else the default, else none (all null).
create function image_queue.limits_for(p_user uuid)
returns table (max_pending integer, per_day integer, usd_per_month numeric, overridden boolean)
language sql stable
set search_path = ''
as $$
  select l.max_pending, l.per_day, l.usd_per_month, l.user_id is not null
  from image_queue.limits l
  where l.user_id = p_user or l.user_id is null
  order by l.user_id nulls last
  limit 1
$$;

-- How much of each limit a user has used, and when the next request becomes possible (null
-- when none is reached; 'infinity' when only a finished request can free a place, or when a
-- limit of 0 turns generation off for the user).
create function image_queue.quota_of(p_user uuid)
returns table (
  max_pending integer, pending integer,
  per_day integer, today integer,
  usd_per_month numeric, spent_this_month numeric,
  next_request_at timestamptz, reached text
)
language plpgsql stable
set search_path = ''
as $$
declare
  lim record;
  month_start timestamptz := date_trunc('month', now(), 'UTC');
  day_free timestamptz;
begin
  select * into lim from image_queue.limits_for(p_user);
  max_pending := lim.max_pending;
  per_day := lim.per_day;
  usd_per_month := lim.usd_per_month;
  select count(*) into pending from image_queue.jobs j where j.user_id = p_user;
  select count(*) into today from image_queue.usage u
  where u.user_id = p_user and u.accepted_at > now() - interval '1 day';
  select coalesce(sum(u.cost_usd), 0) into spent_this_month from image_queue.usage u
  where u.user_id = p_user and u.completed_at >= month_start;

  if usd_per_month is not null and spent_this_month >= usd_per_month then
    reached := 'usd_per_month';
    next_request_at := month_start + interval '1 month';
  end if;
  if per_day is not null and today >= per_day then
    -- the request whose 24 hours end first frees the place that matters
    select u.accepted_at + interval '1 day' into day_free from image_queue.usage u
    where u.user_id = p_user and u.accepted_at > now() - interval '1 day'
    order by u.accepted_at
    offset today - per_day limit 1;
    if next_request_at is null or day_free > next_request_at then
      reached := 'per_day';
      next_request_at := day_free;
    end if;
  end if;
  if max_pending is not null and pending >= max_pending and next_request_at is null then
    reached := 'max_pending';
    next_request_at := 'infinity';
  end if;
  -- A limit of 0 turns image generation off for the user: no time will free a place.
  if 0 in (max_pending, per_day, usd_per_month) then
    reached := 'off';
    next_request_at := 'infinity';
  end if;
  return next;
end
$$;

-- Refuse an insert over a limit: HTTP 429 through PostgREST (which sets request.method), an
-- IL429 error in SQL; the same message both ways.
create function image_queue.refuse(p_message text, p_retry_at timestamptz) returns void
language plpgsql
set search_path = ''
as $$
declare
  headers jsonb := '{}'::jsonb;
begin
  if p_retry_at is not null and p_retry_at < 'infinity' then
    headers := jsonb_build_object(
      'Retry-After', greatest(1, ceil(extract(epoch from p_retry_at - now())))::bigint::text);
  end if;
  if coalesce(current_setting('request.method', true), '') <> '' then
    raise sqlstate 'PGRST' using
      message = jsonb_build_object('code', 'IL429', 'message', p_message,
                                   'details', null, 'hint', null)::text,
      detail = jsonb_build_object('status', 429, 'headers', headers)::text;
  end if;
  raise exception '%', p_message using errcode = 'IL429';
end
$$;

-- A time a user can read: the next whole minute at or after it, in UTC.
create function image_queue.minute_utc(p_at timestamptz) returns text
language sql immutable
set search_path = ''
as $$
  select to_char(date_trunc('minute', p_at + interval '59.999999 seconds') at time zone 'UTC',
                 'YYYY-MM-DD HH24:MI') || ' UTC'
$$;

-- Called by the enqueue trigger for each image request, before its job is created.
create function image_queue.enforce_limits(p_user uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  lim record;
  q record;
begin
  select * into lim from image_queue.limits_for(p_user);
  if lim.max_pending is null and lim.per_day is null and lim.usd_per_month is null then
    return;  -- unlimited: no lock, no counting
  end if;
  -- One insert of this user at a time until commit; each count below then sees the others.
  perform pg_advisory_xact_lock(hashtextextended('image-listener:limits:' || p_user::text, 0));
  select * into q from image_queue.quota_of(p_user);
  case q.reached
    when 'off' then
      perform image_queue.refuse(format(
        'image generation is turned off for this account (%s is 0)',
        case when q.max_pending = 0 then 'max_pending'
             when q.per_day = 0 then 'per_day' else 'usd_per_month' end), null);
    when 'max_pending' then
      perform image_queue.refuse(format(
        'too many unfinished image requests (%s at once); next request possible when one of them is finished',
        q.max_pending), null);
    when 'per_day' then
      perform image_queue.refuse(format(
        'daily image limit reached (%s per day); next request possible at %s',
        q.per_day, image_queue.minute_utc(q.next_request_at)), q.next_request_at);
    when 'usd_per_month' then
      perform image_queue.refuse(format(
        'monthly image budget reached (%s USD of %s USD); next request possible at %s',
        round(q.spent_this_month, 2), q.usd_per_month, image_queue.minute_utc(q.next_request_at)),
        q.next_request_at);
    else
      null;
  end case;
end
$$;

-- The enqueue trigger, now with the limits and the ledger (same name, same trigger).
create or replace function image_queue.enqueue_image_request() returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  owner uuid;
  serving bigint;
  own_last bigint;
begin
  select c.user_id into owner from public.chats c where c.id = new.chat_id;
  if owner is null then
    return null;  -- the foreign key has already rejected such a row; nothing to queue
  end if;
  perform image_queue.enforce_limits(owner);
  insert into image_queue.usage (request_id, user_id) values (new.id, owner)
  on conflict (request_id) do nothing;
  -- Both are one step of an index scan: enqueueing costs the same with any backlog.
  select j.lane_seq into serving from image_queue.jobs j
  where j.state = 'queued' order by j.lane_seq, j.created_at limit 1;
  select j.lane_seq into own_last from image_queue.jobs j
  where j.state = 'queued' and j.user_id = owner order by j.lane_seq desc limit 1;
  insert into image_queue.jobs (request_id, chat_id, user_id, lane_seq)
  values (new.id, new.chat_id, owner, greatest(coalesce(serving, 0), coalesce(own_last + 1, 0)));
  perform pg_notify('image_requests', new.id::text);
  return null;
end
$$;

-- Completion, priced: the reply gets metadata.cost_usd (null for a model without a price) and
-- the ledger the tokens and cost; returns the write's result and the cost, so the listener's
-- metrics count the very number the reply shows.
create function public.image_jobs_complete_priced(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_image_url text,
  p_metadata jsonb
)
returns table (result text, cost_usd numeric)
language plpgsql
security definer
set search_path = ''
as $$
declare
  job image_queue.jobs;
  request_prompt text;
  metadata jsonb := coalesce(p_metadata, '{}'::jsonb);
  model text := metadata ->> 'model';
begin
  delete from image_queue.jobs j
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt
  returning j.* into job;
  if not found then
    result := image_queue.lost_reason(p_request_id);
    return next;
    return;
  end if;

  cost_usd := image_queue.cost_usd(model, metadata -> 'usage');
  metadata := metadata || jsonb_build_object('cost_usd', cost_usd);
  select m.content into request_prompt from public.messages m where m.id = p_request_id;
  insert into public.messages as m
    (chat_id, role, content, message_type, status, image_url, reply_to, metadata)
  values (job.chat_id, 'assistant', format('Image generated from prompt: "%s"', request_prompt),
          'image', 'complete', p_image_url, p_request_id, metadata)
  on conflict (reply_to) where reply_to is not null do update
    set status = 'complete', image_url = excluded.image_url, content = excluded.content,
        error = null, metadata = m.metadata || excluded.metadata;
  insert into image_queue.usage as u
    (request_id, user_id, accepted_at, completed_at, model, input_tokens, output_tokens, cost_usd)
  values (p_request_id, job.user_id, job.created_at, now(), model,
          (metadata #>> '{usage,input_tokens}')::bigint,
          (metadata #>> '{usage,output_tokens}')::bigint, cost_usd)
  on conflict (request_id) do update
    set completed_at = excluded.completed_at, model = excluded.model,
        input_tokens = excluded.input_tokens, output_tokens = excluded.output_tokens,
        cost_usd = excluded.cost_usd;
  result := 'completed';
  return next;
end
$$;

-- The completion older listeners call: same signature and answer, now priced as well.
create or replace function public.image_jobs_complete(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_image_url text,
  p_metadata jsonb
)
returns text
language sql
security definer
set search_path = ''
as $$
  select c.result
  from public.image_jobs_complete_priced(p_request_id, p_worker, p_attempt, p_image_url,
                                         p_metadata) c
$$;

-- A signed-in user's own quota: one row (their numbers only).
create function public.my_image_quota()
returns table (
  max_pending integer, pending integer,
  per_day integer, today integer,
  usd_per_month numeric, spent_this_month numeric,
  next_request_at timestamptz
)
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  me uuid := auth.uid();
begin
  if me is null then
    raise exception 'my_image_quota() needs a signed-in user'
      using errcode = 'invalid_authorization_specification';
  end if;
  return query
    select q.max_pending, q.pending, q.per_day, q.today, q.usd_per_month,
           round(q.spent_this_month, 6), q.next_request_at
    from image_queue.quota_of(me) q;
end
$$;

-- Operator functions behind `image-listener quota | usage | prices` (service role only).

-- Set limits for a user (p_user) or the default (null). p_limits holds the limits to change:
-- {"max_pending": 3, "per_day": null, ...}; a key set to null means unlimited, a missing key
-- keeps its value (a new override starts from the default's values).
create function public.image_quota_set(p_user uuid, p_limits jsonb)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
declare
  bad text;
  base record;
begin
  if p_limits is null or jsonb_typeof(p_limits) <> 'object' then
    raise exception 'p_limits must be a JSON object' using errcode = 'invalid_parameter_value';
  end if;
  select string_agg(k, ', ') into bad from jsonb_object_keys(p_limits) k
  where k not in ('max_pending', 'per_day', 'usd_per_month');
  if bad is not null then
    raise exception 'unknown limit(s): %; known: max_pending, per_day, usd_per_month', bad
      using errcode = 'invalid_parameter_value';
  end if;
  select string_agg(k, ', ') into bad from jsonb_each(p_limits) e(k, v)
  where jsonb_typeof(v) not in ('number', 'null')
     or (jsonb_typeof(v) = 'number' and (v::numeric < 0
         or (k <> 'usd_per_month' and v::numeric <> trunc(v::numeric))));
  if bad is not null then
    raise exception 'limit(s) % must be a number >= 0 (whole for counts) or null for unlimited', bad
      using errcode = 'invalid_parameter_value';
  end if;
  if p_user is not null and not exists (select 1 from auth.users u where u.id = p_user) then
    raise exception 'user % not found', p_user using errcode = 'invalid_parameter_value';
  end if;

  select l.max_pending, l.per_day, l.usd_per_month into base from image_queue.limits l
  where l.user_id is not distinct from p_user;
  if not found then
    select l.max_pending, l.per_day, l.usd_per_month into base from image_queue.limits l
    where l.user_id is null;
    insert into image_queue.limits (user_id, max_pending, per_day, usd_per_month)
    values (p_user, base.max_pending, base.per_day, base.usd_per_month);
  end if;
  update image_queue.limits l set
    max_pending = case when p_limits ? 'max_pending'
                       then (p_limits ->> 'max_pending')::integer else l.max_pending end,
    per_day = case when p_limits ? 'per_day'
                   then (p_limits ->> 'per_day')::integer else l.per_day end,
    usd_per_month = case when p_limits ? 'usd_per_month'
                         then (p_limits ->> 'usd_per_month')::numeric else l.usd_per_month end,
    updated_at = now()
  where l.user_id is not distinct from p_user;
  return public.image_quota_show(p_user);
end
$$;

-- Drop a user's override (they get the default again); whether there was one.
create function public.image_quota_remove(p_user uuid)
returns boolean
language sql
security definer
set search_path = ''
as $$
  with gone as (delete from image_queue.limits l where l.user_id = p_user returning 1)
  select exists (select 1 from gone)
$$;

-- The default limits, and for a user their override, what applies, and what they have used.
create function public.image_quota_show(p_user uuid default null)
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select jsonb_build_object(
    'default', (select to_jsonb(d) - 'user_id' - 'updated_at'
                from image_queue.limits d where d.user_id is null),
    'any_limit', exists (
      select 1 from image_queue.limits l
      where l.max_pending is not null or l.per_day is not null or l.usd_per_month is not null),
    'user', case when p_user is null then null else jsonb_build_object(
      'user_id', p_user,
      'override', (select to_jsonb(o) - 'user_id' - 'updated_at'
                   from image_queue.limits o where o.user_id = p_user),
      'quota', (select to_jsonb(q) from image_queue.quota_of(p_user) q)
    ) end
  )
$$;

-- Images, tokens and USD since p_since: by user, or for one user by day (UTC).
create function public.image_usage(p_since timestamptz, p_user uuid default null)
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(jsonb_agg(r order by r.key), '[]'::jsonb)
  from (
    select case when p_user is null then u.user_id::text
                else to_char(u.completed_at at time zone 'UTC', 'YYYY-MM-DD') end as key,
           count(*) as images,
           coalesce(sum(u.input_tokens), 0) as input_tokens,
           coalesce(sum(u.output_tokens), 0) as output_tokens,
           round(coalesce(sum(u.cost_usd), 0), 6) as usd,
           count(*) filter (where u.cost_usd is null) as unpriced
    from image_queue.usage u
    where u.completed_at >= p_since and (p_user is null or u.user_id = p_user)
    group by 1
  ) r
$$;

create function public.image_prices_set(
  p_model text,
  p_input_text numeric,
  p_input_image numeric,
  p_output_image numeric
)
returns jsonb
language sql
security definer
set search_path = ''
as $$
  insert into image_queue.prices as p
    (model, input_text_usd_per_1m, input_image_usd_per_1m, output_image_usd_per_1m)
  values (p_model, p_input_text, p_input_image, p_output_image)
  on conflict (model) do update
    set input_text_usd_per_1m = excluded.input_text_usd_per_1m,
        input_image_usd_per_1m = excluded.input_image_usd_per_1m,
        output_image_usd_per_1m = excluded.output_image_usd_per_1m,
        updated_at = now()
  returning to_jsonb(p)
$$;

create function public.image_prices()
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select coalesce(jsonb_agg(to_jsonb(p) order by p.model), '[]'::jsonb) from image_queue.prices p
$$;

-- The requests of the last 35 days join the ledger, so that limits count them from the first
-- insert after this migration (with the tokens and, at today's prices, the cost of those
-- that completed).
insert into image_queue.usage
  (request_id, user_id, accepted_at, completed_at, model, input_tokens, output_tokens, cost_usd)
select q.id, c.user_id, q.created_at,
       case when r.status = 'complete' then r.updated_at end,
       r.metadata ->> 'model',
       (r.metadata #>> '{usage,input_tokens}')::bigint,
       (r.metadata #>> '{usage,output_tokens}')::bigint,
       case when r.status = 'complete'
            then image_queue.cost_usd(r.metadata ->> 'model', r.metadata -> 'usage') end
from public.messages q
join public.chats c on c.id = q.chat_id
left join public.messages r on r.reply_to = q.id
where q.role = 'user' and q.message_type = 'image' and q.created_at > now() - interval '35 days'
on conflict (request_id) do nothing;

do $$
declare
  fn text;
begin
  foreach fn in array array[
    'public.image_jobs_complete_priced(uuid, text, integer, text, jsonb)',
    'public.image_quota_set(uuid, jsonb)',
    'public.image_quota_remove(uuid)',
    'public.image_quota_show(uuid)',
    'public.image_usage(timestamptz, uuid)',
    'public.image_prices_set(text, numeric, numeric, numeric)',
    'public.image_prices()'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
  foreach fn in array array[
    'image_queue.cost_usd(text, jsonb)',
    'image_queue.limits_for(uuid)',
    'image_queue.quota_of(uuid)',
    'image_queue.refuse(text, timestamptz)',
    'image_queue.minute_utc(timestamptz)',
    'image_queue.enforce_limits(uuid)'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
  end loop;
end
$$;

revoke all on function public.my_image_quota() from public, anon;
grant execute on function public.my_image_quota() to authenticated;
