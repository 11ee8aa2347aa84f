-- The work queue behind image requests. The job table lives in a schema the frontend cannot
-- reach; every state change is one SQL function, executable by the service role (and the
-- owner) only. Jobs exist only while a request is unfinished: completion or giving up deletes
-- the job, so the table stays small and "no job left behind" is checkable.
--
-- States: 'queued' (claimable now), 'waiting' (a retry not due before run_at), 'running'
-- (leased to a worker until lease_expires_at). Every claim path walks a partial index in order
-- and stops at its limit, so the cost of a claim does not grow with the backlog.
--
-- Lease and fencing: a claim sets lease_holder and increments attempts; (lease_holder,
-- attempts) is the fencing token that complete/fail/release/extend must present, so a worker
-- whose lease expired and was taken over can never overwrite the new holder's work.
--
-- Fairness between users: each queued job has a lane position (lane_seq); claims take the
-- lowest first. A user's first queued job enters at the position now being served (the lowest
-- queued lane_seq), each further queued job of the same user one position later. So a user who
-- floods the queue with thousands of requests gets one job per round, and another user's
-- single request waits at most about one round, not behind the whole flood.
--
-- Suspects: a job whose lease expired may have killed its worker (a poison request). After one
-- crash a job is taken over like any other (most crashes are deploys and OOM kills, and the
-- whole batch should come back fast). From its second crash on it is isolated: taken one per
-- claim and never by a worker already running such a job. So a request that crashes every
-- process it touches shares a process with another twice-crashed job never again, and an
-- innocent job that happened to share its process loses at most two attempts to it.

create schema image_queue;
revoke all on schema image_queue from public, anon, authenticated;

create table image_queue.jobs (
  request_id uuid primary key references public.messages (id) on delete cascade,
  chat_id uuid not null,
  user_id uuid not null,
  state text not null default 'queued',
  lane_seq bigint not null default 0,
  attempts integer not null default 0,
  -- how often a lease on this job expired (its worker died or stalled): see "Suspects" above
  crashes integer not null default 0,
  run_at timestamptz not null default now(),
  lease_holder text,
  lease_expires_at timestamptz,
  last_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint jobs_state_check check (state in ('queued', 'waiting', 'running')),
  constraint jobs_lease_check check (
    (state = 'running') = (lease_holder is not null and lease_expires_at is not null)
  ),
  constraint jobs_attempts_check check (attempts >= 0)
);

create index jobs_queued_lane_idx on image_queue.jobs (lane_seq, created_at)
  where state = 'queued';
create index jobs_queued_user_lane_idx on image_queue.jobs (user_id, lane_seq)
  where state = 'queued';
create index jobs_queued_isolated_idx on image_queue.jobs (lane_seq, created_at)
  where state = 'queued' and crashes >= 2;
create index jobs_waiting_run_at_idx on image_queue.jobs (run_at) where state = 'waiting';

-- Every job is inserted, updated and deleted within minutes: vacuum and analyze after a fixed
-- number of changes, not a share of the table, so dead entries never pile up at the head of the
-- indexes every claim walks (and the planner's statistics follow bursts).
alter table image_queue.jobs set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 1000,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 1000
);
create index jobs_running_lease_idx on image_queue.jobs (lease_expires_at) where state = 'running';

revoke all on table image_queue.jobs from public, anon, authenticated;

-- Enqueue in the inserting transaction, and wake listeners with the request id only (the
-- notification is delivered at commit; the row is the truth, the notification a hint).
create function image_queue.enqueue_image_request() returns trigger
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

revoke all on function image_queue.enqueue_image_request() from public, anon, authenticated;

create trigger messages_enqueue_image_request
  after insert on public.messages
  for each row
  when (new.role = 'user' and new.message_type = 'image')
  execute function image_queue.enqueue_image_request();

-- Claim up to p_limit due jobs: expired leases first (isolating suspects, see above), then
-- queued ones in lane order (see fairness above), after moving due retries into the queue. Each step walks its own partial index in order and stops at its
-- limit, so a claim stays cheap with a deep backlog. A job already claimed p_max_attempts times is not handed out again: it ends here
-- with a failed reply, so a request that crashes every worker that touches it cannot block
-- the queue forever (such jobs count against p_limit; the caller simply claims again).
create function public.image_jobs_claim(
  p_worker text,
  p_limit integer,
  p_lease_seconds double precision,
  p_max_attempts integer
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
#variable_conflict use_column
declare
  picked uuid[];
  queued uuid[];
  holds_isolated boolean;
  expired record;
begin
  if p_worker is null or p_worker = '' then
    raise exception 'p_worker must name the claiming worker' using errcode = 'invalid_parameter_value';
  end if;
  if p_limit is null or p_limit < 1 or p_lease_seconds is null or p_lease_seconds <= 0
     or p_max_attempts is null or p_max_attempts < 1 then
    raise exception 'p_limit, p_lease_seconds and p_max_attempts must be positive'
      using errcode = 'invalid_parameter_value';
  end if;

  picked := '{}';
  holds_isolated := exists (
    select 1 from image_queue.jobs j
    where j.state = 'running' and j.lease_holder = p_worker and j.crashes >= 2
  );
  -- Expired leases first (their worker died or stalled); a second crash isolates the job.
  for expired in
    select j.request_id, j.crashes from image_queue.jobs j
    where j.state = 'running' and j.lease_expires_at <= now()
    order by j.lease_expires_at
    limit p_limit
    for update skip locked
  loop
    if expired.crashes >= 1 then
      continue when holds_isolated;
      holds_isolated := true;
    end if;
    picked := picked || expired.request_id;
  end loop;
  -- An isolated job an operator requeued (requeue-stuck), if this worker may take one.
  if not holds_isolated and cardinality(picked) < p_limit then
    select coalesce(array_agg(q.request_id), '{}') into queued
    from (
      select j.request_id from image_queue.jobs j
      where j.state = 'queued' and j.crashes >= 2
      order by j.lane_seq, j.created_at
      limit 1
      for update skip locked
    ) q;
    picked := picked || queued;
  end if;
  -- Retries whose time has come join the queue (keeping their lane position).
  update image_queue.jobs j
  set state = 'queued', updated_at = now()
  where j.request_id in (
    select w.request_id from image_queue.jobs w
    where w.state = 'waiting' and w.run_at <= now()
    order by w.run_at
    limit 1000
    for update skip locked
  );
  if cardinality(picked) < p_limit then
    select coalesce(array_agg(q.request_id), '{}') into queued
    from (
      select j.request_id from image_queue.jobs j
      where j.state = 'queued' and j.crashes < 2
      order by j.lane_seq, j.created_at
      limit p_limit - cardinality(picked)
      for update skip locked
    ) q;
    picked := picked || queued;
  end if;
  if cardinality(picked) = 0 then
    return;
  end if;

  with gone as (
    delete from image_queue.jobs j
    where j.request_id = any (picked) and j.attempts >= p_max_attempts
    returning j.request_id, j.chat_id, j.attempts
  )
  insert into public.messages as m (chat_id, role, content, message_type, status, error, reply_to, metadata)
  select g.chat_id, 'assistant',
         'The image could not be generated: the request failed ' || g.attempts || ' times.',
         'image', 'failed',
         'The image could not be generated: the request failed ' || g.attempts || ' times.',
         g.request_id,
         jsonb_build_object('error_code', 'attempts_exhausted', 'attempts', g.attempts)
  from gone g
  on conflict (reply_to) where reply_to is not null do update
    set status = excluded.status, error = excluded.error, content = excluded.content,
        image_url = null, metadata = (m.metadata - 'retry_at') || excluded.metadata;

  return query
  with leased as (
    update image_queue.jobs j
    set crashes = j.crashes + (j.state = 'running')::integer,
        state = 'running',
        attempts = j.attempts + 1,
        lease_holder = p_worker,
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        updated_at = now()
    where j.request_id = any (picked) and j.attempts < p_max_attempts
    returning j.request_id, j.chat_id, j.user_id, j.attempts, j.lease_expires_at
  ), replies as (
    insert into public.messages as m (chat_id, role, content, message_type, status, reply_to, metadata)
    select l.chat_id, 'assistant', 'Generating image...', 'image', 'generating', l.request_id,
           jsonb_build_object('attempt', l.attempts)
    from leased l
    on conflict (reply_to) where reply_to is not null do update
      set status = 'generating', error = null,
          metadata = m.metadata || jsonb_build_object('attempt', excluded.metadata -> 'attempt')
    returning m.id, m.reply_to
  )
  select l.request_id, r.id, l.chat_id, l.user_id, q.content, q.options, l.attempts,
         l.lease_expires_at, q.created_at
  from leased l
  join replies r on r.reply_to = l.request_id
  join public.messages q on q.id = l.request_id;
end
$$;

-- Renew the leases this worker still holds; returns the ids it still holds (a missing id means
-- the lease was lost or the request was deleted: stop working on it).
create function public.image_jobs_extend(
  p_worker text,
  p_request_ids uuid[],
  p_attempts integer[],
  p_lease_seconds double precision
)
returns setof uuid
language sql
security definer
set search_path = ''
as $$
  update image_queue.jobs j
  set lease_expires_at = now() + make_interval(secs => p_lease_seconds), updated_at = now()
  from unnest(p_request_ids, p_attempts) as held (request_id, attempt)
  where j.request_id = held.request_id
    and j.attempts = held.attempt
    and j.state = 'running'
    and j.lease_holder = p_worker
  returning j.request_id
$$;

-- Why a fenced write did nothing: the request is gone (cancelled) or someone else holds it.
create function image_queue.lost_reason(p_request_id uuid) returns text
language sql stable
set search_path = ''
as $$
  select case
    when exists (select 1 from public.messages m where m.id = p_request_id) then 'lease_lost'
    else 'cancelled'
  end
$$;

-- Finish a job with its image. Returns 'completed', or 'lease_lost' / 'cancelled' when the
-- caller no longer holds the lease (then nothing was written).
create function public.image_jobs_complete(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_image_url text,
  p_metadata jsonb
)
returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  job image_queue.jobs;
  request_prompt text;
begin
  delete from image_queue.jobs j
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt
  returning j.* into job;
  if not found then
    return image_queue.lost_reason(p_request_id);
  end if;

  select m.content into request_prompt from public.messages m where m.id = p_request_id;
  insert into public.messages as m
    (chat_id, role, content, message_type, status, image_url, reply_to, metadata)
  values (job.chat_id, 'assistant', format('Image generated from prompt: "%s"', request_prompt),
          'image', 'complete', p_image_url, p_request_id, coalesce(p_metadata, '{}'::jsonb))
  on conflict (reply_to) where reply_to is not null do update
    set status = 'complete', image_url = excluded.image_url, content = excluded.content,
        error = null, metadata = m.metadata || excluded.metadata;
  return 'completed';
end
$$;

-- Record a failed attempt. p_retry_in_seconds not null: wait that long, then queue it again
-- (the reply stays 'generating'); null: give up with a failed reply carrying the user-safe p_error.
-- p_detail is for operators only and stays in the job table. Returns 'retrying', 'failed',
-- or 'lease_lost' / 'cancelled'.
create function public.image_jobs_fail(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_error text,
  p_detail text,
  p_retry_in_seconds double precision,
  p_metadata jsonb
)
returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  job image_queue.jobs;
begin
  if p_retry_in_seconds is not null then
    update image_queue.jobs j
    set state = 'waiting', lease_holder = null, lease_expires_at = null,
        run_at = now() + make_interval(secs => greatest(p_retry_in_seconds, 0)),
        last_error = left(p_detail, 2000), updated_at = now()
    where j.request_id = p_request_id and j.state = 'running'
      and j.lease_holder = p_worker and j.attempts = p_attempt;
    if not found then
      return image_queue.lost_reason(p_request_id);
    end if;
    update public.messages m
    set metadata = m.metadata || coalesce(p_metadata, '{}'::jsonb)
                  || jsonb_build_object('retry_at', now() + make_interval(secs => greatest(p_retry_in_seconds, 0)))
    where m.reply_to = p_request_id;
    return 'retrying';
  end if;

  delete from image_queue.jobs j
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt
  returning j.* into job;
  if not found then
    return image_queue.lost_reason(p_request_id);
  end if;

  insert into public.messages as m
    (chat_id, role, content, message_type, status, error, reply_to, metadata)
  values (job.chat_id, 'assistant', 'The image could not be generated. ' || p_error,
          'image', 'failed', p_error, p_request_id, coalesce(p_metadata, '{}'::jsonb))
  on conflict (reply_to) where reply_to is not null do update
    set status = 'failed', error = excluded.error, content = excluded.content,
        image_url = null, metadata = (m.metadata - 'retry_at') || excluded.metadata;
  return 'failed';
end
$$;

-- Hand a job back without counting the attempt (graceful shutdown before it finished).
create function public.image_jobs_release(
  p_request_id uuid,
  p_worker text,
  p_attempt integer
)
returns text
language plpgsql
security definer
set search_path = ''
as $$
begin
  update image_queue.jobs j
  set state = 'queued', lease_holder = null, lease_expires_at = null, run_at = now(),
      attempts = greatest(j.attempts - 1, 0), updated_at = now()
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt;
  if not found then
    return image_queue.lost_reason(p_request_id);
  end if;
  perform pg_notify('image_requests', p_request_id::text);
  return 'released';
end
$$;

-- When the next job becomes due (a queued run_at or a running lease's expiry), so an idle
-- listener can sleep exactly until then instead of polling blindly. Null when the queue is empty.
create function public.image_jobs_next_due() returns timestamptz
language sql stable
security definer
set search_path = ''
as $$
  select least(
    (select now() where exists (select 1 from image_queue.jobs j where j.state = 'queued')),
    (select min(j.run_at) from image_queue.jobs j where j.state = 'waiting'),
    (select min(j.lease_expires_at) from image_queue.jobs j where j.state = 'running')
  )
$$;

do $$
declare
  fn text;
begin
  foreach fn in array array[
    'public.image_jobs_claim(text, integer, double precision, integer)',
    'public.image_jobs_extend(text, uuid[], integer[], double precision)',
    'public.image_jobs_complete(uuid, text, integer, text, jsonb)',
    'public.image_jobs_fail(uuid, text, integer, text, text, double precision, jsonb)',
    'public.image_jobs_release(uuid, text, integer)',
    'public.image_jobs_next_due()',
    'image_queue.lost_reason(uuid)'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end
$$;
