-- One provider budget for the whole fleet. The provider limits the organisation to a number of
-- images per minute and answers 429 beyond it; every listener on this database shares one
-- budget, kept here, so that together they start no more calls than that.
--
-- The rate in force, per minute, is the first that is set of:
--   1. the operator's value (image_provider_budget_set), which wins over every listener;
--   2. the smallest IMAGE_LISTENER_PROVIDER_IMAGES_PER_MINUTE among the listeners that claimed
--      within the last two minutes (each claim announces its setting; a listener that stopped
--      stops counting after two minutes, so a larger value can take over);
--   3. the learned rate: with no budget set, the first rate-limit 429 starts it (a first
--      guess: the calls started within the provider's pause that were not refused, over it),
--      each 429 that starts a later pause lowers it (x 0.85), and each call started while the
--      budget held claims back raises it by a fixed step (3/800 of the rate before the last
--      decrease, at least 1 per minute: about 40 calls to climb back) -- additive increase,
--      multiplicative decrease;
--   4. none: no 429 seen yet, no budget set. The claim then takes no lock and writes nothing.
--
-- The budget is a token bucket taken in the claim (no extra round trip): tokens accrue at the
-- rate, at most a tenth of a second's worth (at least one), so starts are spread evenly with
-- little burst, which is what a provider that counts calls in a sliding window needs.
--
-- A rate-limit 429 (image_jobs_rate_limited) hands the job back to the queue without spending
-- its attempt (its reply says 'queued' again, its place in the fair order kept) and pauses the
-- whole fleet until the provider's retry-after (or a backoff of 1, 2, 4 ... 60 s when it gave
-- none, or when pauses follow each other with no time between): no listener starts a call until
-- then. image_jobs_next_start() tells an idle listener
-- when the next call may start (the next token, the pause's end), so it sleeps until then.
--
-- Listeners of earlier releases keep calling image_jobs_claim, which ignores the budget: the
-- budget holds once every listener runs this release.

create table image_queue.provider_budget (
  id boolean primary key default true constraint provider_budget_single_row check (id),
  operator_per_minute double precision
    constraint provider_budget_operator_positive check (operator_per_minute > 0),
  listener_per_minute double precision
    constraint provider_budget_listener_positive check (listener_per_minute > 0),
  listener_seen_at timestamptz,
  learned_per_minute double precision,
  learned_step double precision,
  -- while the pause that started learning lasts: its length (each further 429 in it lowers the
  -- first guess by one call per that many seconds)
  guess_pause_seconds double precision,
  tokens double precision not null default 1,
  refilled_at timestamptz not null default now(),
  paused_until timestamptz,
  last_limited_at timestamptz,
  consecutive_limited integer not null default 0,
  -- counters since the migration: rate-limit 429s reported, fleet pauses, learned decreases
  rate_limited bigint not null default 0,
  pauses bigint not null default 0,
  decreases bigint not null default 0,
  updated_at timestamptz not null default now()
);
-- a full bucket at first use, whatever the rate
insert into image_queue.provider_budget (tokens, refilled_at) values (0, '2000-01-01 00:00+00');
revoke all on table image_queue.provider_budget from public, anon, authenticated;

-- The rate in force (per minute, null = none) and where it comes from.
create function image_queue.budget_in_force(
  b image_queue.provider_budget,
  out per_minute double precision,
  out source text
)
language sql stable
set search_path = ''
as $$
  select
    case
      when b.operator_per_minute is not null then b.operator_per_minute
      when b.listener_seen_at >= now() - interval '2 minutes' then b.listener_per_minute
      else b.learned_per_minute
    end,
    case
      when b.operator_per_minute is not null then 'operator'
      when b.listener_seen_at >= now() - interval '2 minutes' then 'listeners'
      when b.learned_per_minute is not null then 'learned'
      else 'none'
    end
$$;

-- Tokens now (the bucket refilled up to its capacity), for a rate per minute. The capacity is a
-- tenth of a second's worth, at least one: no slack for a claim that comes late for its token
-- (the next is due a full interval after it), so that any N successive starts span at least
-- N intervals, as a provider counting calls in a sliding window requires at its exact limit.
-- A listener waits for its token the time the database tells it (image_jobs_next_start), so
-- it is late by one timer and one round trip: about 1% of the rate at 5 calls per second.
create function image_queue.budget_tokens(b image_queue.provider_budget, p_per_minute double precision)
returns double precision
language sql stable
set search_path = ''
as $$
  select least(
    greatest(1.0, p_per_minute / 600.0),
    b.tokens + greatest(extract(epoch from now() - b.refilled_at), 0) * p_per_minute / 60.0
  )
$$;

-- The claim within the budget: image_jobs_claim for at most as many jobs as there are tokens,
-- and none while the fleet is paused. p_images_per_minute is this listener's setting (null:
-- none). Same answer as image_jobs_claim.
create function public.image_jobs_claim_within_budget(
  p_worker text,
  p_limit integer,
  p_lease_seconds double precision,
  p_max_attempts integer,
  p_images_per_minute double precision default null
)
returns table (
  request_id uuid,
  reply_id uuid,
  chat_id uuid,
  user_id uuid,
  prompt text,
  options jsonb,
  attempt integer,
  lease_expires_at timestamptz,
  requested_at timestamptz
)
language plpgsql
security definer
set search_path = ''
as $$
declare
  b image_queue.provider_budget;
  rate record;
  granted integer;
  claimed integer;
begin
  if p_images_per_minute is not null
     and not (p_images_per_minute > 0 and p_images_per_minute < 'infinity') then
    raise exception 'p_images_per_minute must be a positive number or null'
      using errcode = 'invalid_parameter_value';
  end if;
  -- The common path reads the row and takes no lock: nothing set, nothing learned, no pause.
  select * into b from image_queue.provider_budget;
  if b.paused_until > now() then
    return;
  end if;
  rate := image_queue.budget_in_force(b);
  if p_images_per_minute is null and rate.per_minute is null then
    return query select * from public.image_jobs_claim(
      p_worker, p_limit, p_lease_seconds, p_max_attempts);
    return;
  end if;

  select * into b from image_queue.provider_budget for update;
  if b.paused_until > now() then
    return;
  end if;
  if p_images_per_minute is not null
     and (b.listener_per_minute is null or p_images_per_minute <= b.listener_per_minute
          or b.listener_seen_at < now() - interval '2 minutes') then
    b.listener_per_minute := p_images_per_minute;
    b.listener_seen_at := now();
  end if;
  rate := image_queue.budget_in_force(b);
  b.tokens := image_queue.budget_tokens(b, rate.per_minute);
  b.refilled_at := now();
  granted := least(p_limit, floor(b.tokens)::integer);
  claimed := 0;
  if granted >= 1 then
    return query select * from public.image_jobs_claim(
      p_worker, granted, p_lease_seconds, p_max_attempts);
    get diagnostics claimed = row_count;
  end if;
  b.tokens := b.tokens - claimed;
  if rate.source = 'learned' and claimed > 0 and granted < p_limit then
    b.learned_per_minute := b.learned_per_minute + claimed * b.learned_step;
  end if;
  update image_queue.provider_budget p
  set listener_per_minute = b.listener_per_minute, listener_seen_at = b.listener_seen_at,
      tokens = b.tokens, refilled_at = b.refilled_at,
      learned_per_minute = b.learned_per_minute, updated_at = now()
  where p.id;
end
$$;

-- A call was refused with a rate-limit 429: the job goes back to the queue without spending its
-- attempt, and the fleet pauses. p_retry_after_seconds is the provider's hint (null: none, and
-- the pause backs off 1, 2, 4 ... 60 s over pauses that follow each other). Fenced like every write; returns
-- 'requeued', or 'lease_lost' / 'cancelled'.
create function public.image_jobs_rate_limited(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_retry_after_seconds double precision,
  p_detail text
)
returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  b image_queue.provider_budget;
  rate record;
  pause double precision;
  was_paused boolean;
  running integer;
begin
  update image_queue.jobs j
  set state = 'queued', lease_holder = null, lease_expires_at = null, run_at = now(),
      attempts = greatest(j.attempts - 1, 0), last_error = left(p_detail, 2000),
      updated_at = now()
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt;
  if not found then
    return image_queue.lost_reason(p_request_id);
  end if;
  perform image_queue.reply_queued(array[p_request_id]);

  select * into b from image_queue.provider_budget for update;
  was_paused := coalesce(b.paused_until > now(), false);
  -- A pause that starts within a second of the last one's end follows it: the pauses grow.
  if not was_paused then
    if b.paused_until is null or b.paused_until < now() - interval '1 second' then
      b.consecutive_limited := 0;
    end if;
    b.consecutive_limited := b.consecutive_limited + 1;
  end if;
  if p_retry_after_seconds is not null and p_retry_after_seconds >= 0
     and p_retry_after_seconds < 'infinity' then
    -- The provider's word, for two pauses in a row; from the third on, at least 1, 2, 4 ... 60 s,
    -- so that a provider that keeps saying "now" is not called in a tight loop.
    pause := least(p_retry_after_seconds, 3600);
    if b.consecutive_limited >= 3 then
      pause := greatest(pause, least(60.0, 2.0 ^ least(b.consecutive_limited - 3, 6)));
    end if;
  else
    pause := least(60.0, 2.0 ^ least(b.consecutive_limited - 1, 6));
  end if;
  rate := image_queue.budget_in_force(b);
  if rate.source in ('learned', 'none') then
    if not was_paused then
      b.guess_pause_seconds := null;
      if b.learned_per_minute is null then
        -- The first 429: the calls the fleet started within the provider's pause (those in
        -- flight, and those completed within it), other than this one, per that pause (a
        -- sliding window frees its first slot after it); each other call that comes back 429
        -- in this pause takes itself out below. It errs high, which costs little.
        b.guess_pause_seconds := greatest(pause, 1.0);
        select (select count(*) from image_queue.jobs j where j.state = 'running')
             + (select count(*) from image_queue.usage u
                where u.completed_at >= now() - make_interval(secs => b.guess_pause_seconds))
          into running;
        b.learned_per_minute := 60.0 * greatest(running, 1) / b.guess_pause_seconds;
      else
        b.learned_per_minute := greatest(1.0, b.learned_per_minute * 0.85);
      end if;
      b.learned_step := greatest(1.0, b.learned_per_minute / 0.85 * 0.15 / 40.0);
      b.decreases := b.decreases + 1;
      b.tokens := least(b.tokens, 1.0);
    elsif b.guess_pause_seconds is not null then
      b.learned_per_minute := greatest(1.0, b.learned_per_minute - 60.0 / b.guess_pause_seconds);
      b.learned_step := greatest(1.0, b.learned_per_minute / 0.85 * 0.15 / 40.0);
    end if;
  end if;
  update image_queue.provider_budget p
  set paused_until = greatest(b.paused_until, now() + make_interval(secs => pause)),
      last_limited_at = now(),
      consecutive_limited = b.consecutive_limited,
      rate_limited = b.rate_limited + 1,
      pauses = b.pauses + (not was_paused)::integer,
      decreases = b.decreases,
      learned_per_minute = b.learned_per_minute,
      learned_step = b.learned_step,
      guess_pause_seconds = b.guess_pause_seconds,
      tokens = b.tokens,
      updated_at = now()
  where p.id;
  return 'requeued';
end
$$;

-- When an idle listener should claim next: the queue's next due time, no earlier than the next
-- token or the pause's end, and how many seconds from now that is by the database's clock (a
-- listener sleeps that long, whatever its own clock says). held_by says why it is later than the
-- queue alone would say ('budget', 'pause' or null); the rest describes the budget as it stands.
create function public.image_jobs_next_start()
returns table (
  due_at timestamptz,
  wait_seconds double precision,
  held_by text,
  per_minute double precision,
  source text,
  tokens double precision,
  paused_until timestamptz
)
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  b image_queue.provider_budget;
  rate record;
  due timestamptz;
  gate timestamptz;
  gate_kind text;
  available double precision;
begin
  select * into b from image_queue.provider_budget;
  rate := image_queue.budget_in_force(b);
  due := public.image_jobs_next_due();
  if b.paused_until > now() then
    gate := b.paused_until;
    gate_kind := 'pause';
  end if;
  if rate.per_minute is not null then
    available := image_queue.budget_tokens(b, rate.per_minute);
    if gate is null and available < 1 then
      gate := now() + make_interval(secs => (1 - available) * 60.0 / rate.per_minute);
      gate_kind := 'budget';
    end if;
  end if;
  -- (greatest ignores nulls: an empty queue, due null, stays null)
  return query select
    case when due is not null then greatest(due, gate) end,
    case when due is not null
         then greatest(extract(epoch from greatest(due, gate) - now())::double precision, 0) end,
    case when gate > due then gate_kind end,
    rate.per_minute, rate.source, available,
    case when b.paused_until > now() then b.paused_until end;
end
$$;

-- The budget as it stands, for `image-listener status` and `doctor`.
create function public.image_provider_budget()
returns jsonb
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  b image_queue.provider_budget;
  rate record;
begin
  select * into b from image_queue.provider_budget;
  rate := image_queue.budget_in_force(b);
  return jsonb_build_object(
    'per_minute', rate.per_minute,
    'source', rate.source,
    'operator_per_minute', b.operator_per_minute,
    'listener_per_minute',
      case when b.listener_seen_at >= now() - interval '2 minutes' then b.listener_per_minute end,
    'learned_per_minute', b.learned_per_minute,
    'tokens', case when rate.per_minute is not null
                   then image_queue.budget_tokens(b, rate.per_minute) end,
    'paused_until', case when b.paused_until > now() then b.paused_until end,
    'last_rate_limited_at', b.last_limited_at,
    'rate_limited', b.rate_limited,
    'pauses', b.pauses,
    'decreases', b.decreases
  );
end
$$;

-- The operator's budget: a rate per minute that wins over every listener's setting, or null to
-- hand the decision back to the listeners. p_forget_learned drops the learned rate and any
-- pause (after a tier upgrade, say). Returns the budget as image_provider_budget() does.
create function public.image_provider_budget_set(
  p_images_per_minute double precision,
  p_forget_learned boolean default false
)
returns jsonb
language plpgsql
security definer
set search_path = ''
as $$
begin
  if p_images_per_minute is not null
     and not (p_images_per_minute > 0 and p_images_per_minute < 'infinity') then
    raise exception 'images per minute must be a positive number, got %', p_images_per_minute
      using errcode = 'invalid_parameter_value';
  end if;
  update image_queue.provider_budget p
  set operator_per_minute = p_images_per_minute,
      learned_per_minute = case when p_forget_learned then null else p.learned_per_minute end,
      learned_step = case when p_forget_learned then null else p.learned_step end,
      guess_pause_seconds = case when p_forget_learned then null else p.guess_pause_seconds end,
      paused_until = case when p_forget_learned then null else p.paused_until end,
      tokens = least(p.tokens, 1.0),
      updated_at = now()
  where p.id;
  return public.image_provider_budget();
end
$$;

do $$
declare
  fn text;
begin
  foreach fn in array array[
    'public.image_jobs_claim_within_budget(text, integer, double precision, integer, double precision)',
    'public.image_jobs_rate_limited(uuid, text, integer, double precision, text)',
    'public.image_jobs_next_start()',
    'public.image_provider_budget()',
    'public.image_provider_budget_set(double precision, boolean)'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
  foreach fn in array array[
    'image_queue.budget_in_force(image_queue.provider_budget)',
    'image_queue.budget_tokens(image_queue.provider_budget, double precision)'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
  end loop;
end
$$;

comment on function public.image_jobs_claim_within_budget(text, integer, double precision, integer, double precision) is
  'listener/queue/calls.py QueueCalls.claim; the budget: migrations/20261205160000_provider_budget.sql';
comment on function public.image_jobs_rate_limited(uuid, text, integer, double precision, text) is
  'listener/runtime/processor.py (a RateLimited error); QueueCalls.rate_limited';
comment on function public.image_jobs_next_start() is
  'listener/runtime/worker.py _idle_wait; QueueCalls.next_start';
