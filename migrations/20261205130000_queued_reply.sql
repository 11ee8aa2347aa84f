-- The reply exists from the insert: the transaction that inserts an image request also inserts
-- its one assistant reply, status 'queued', so that the frontend subscribes to one row and
-- draws it from the first millisecond. The claim turns it into 'generating' (as before, with
-- the same upsert, so a listener of the previous release keeps working), then 'complete' or
-- 'failed'. A job handed back to the queue (release, requeue-stuck, an operator's retry) puts
-- its reply back to 'queued'. Requests queued under the old rule get their queued reply here.
--
-- public.image_request_position(request_id) tells the request's owner how many queued requests
-- the fair order will claim before theirs (0 = next), or null once it is no longer queued.

alter table public.messages drop constraint messages_status_check;
alter table public.messages add constraint messages_status_check
  check (status in ('queued', 'generating', 'complete', 'failed'));

-- The text of a queued reply (one place: the trigger, release, requeue and retry use it).
create function image_queue.queued_content() returns text
language sql immutable
set search_path = ''
as $$ select 'Queued: the image will be generated as soon as a worker is free.'::text $$;

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
  insert into public.messages (chat_id, role, content, message_type, status, reply_to)
  values (new.chat_id, 'assistant', image_queue.queued_content(), 'image', 'queued', new.id)
  on conflict (reply_to) where reply_to is not null do nothing;
  perform pg_notify('image_requests', new.id::text);
  return null;
end
$$;

-- The claim, unchanged but for one line: the reply it turns into 'generating' was 'queued' (it
-- existed before), so its content changes too. Same signature, for listeners of every release.
create or replace function public.image_jobs_claim(
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
      set status = 'generating', error = null, content = excluded.content,
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

-- Back in the queue: the reply says so again (release on shutdown, requeue-stuck, retry).
create function image_queue.reply_queued(p_request_ids uuid[]) returns void
language sql
set search_path = ''
as $$
  update public.messages m
  set status = 'queued', content = image_queue.queued_content(), error = null, image_url = null
  where m.reply_to = any (p_request_ids) and m.status in ('generating', 'failed')
$$;

create or replace function public.image_jobs_release(
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
  perform image_queue.reply_queued(array[p_request_id]);
  perform pg_notify('image_requests', p_request_id::text);
  return 'released';
end
$$;

create or replace function public.image_jobs_requeue_stuck()
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  moved uuid[];
begin
  with requeued as (
    update image_queue.jobs j
    set state = 'queued', crashes = j.crashes + 1, lease_holder = null, lease_expires_at = null,
        updated_at = now()
    where j.state = 'running' and j.lease_expires_at <= now()
    returning j.request_id
  )
  select coalesce(array_agg(r.request_id), '{}') into moved from requeued r;
  if cardinality(moved) > 0 then
    perform image_queue.reply_queued(moved);
    perform pg_notify('image_requests', '');
  end if;
  return cardinality(moved);
end
$$;

-- Retry a failed request: as before (a fresh job, the same reply row), the reply now 'queued'.
create or replace function public.image_jobs_retry(p_request_id uuid)
returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  owner uuid;
begin
  if not exists (select 1 from public.messages m where m.id = p_request_id
                 and m.role = 'user' and m.message_type = 'image') then
    return 'not_found';
  end if;
  if exists (select 1 from image_queue.jobs j where j.request_id = p_request_id) then
    return 'in_progress';
  end if;
  update public.messages m
  set status = 'queued', error = null, image_url = null, content = image_queue.queued_content(),
      metadata = m.metadata - 'error_code' || jsonb_build_object('retried_at', now())
  where m.reply_to = p_request_id and m.status = 'failed';
  if not found then
    return 'not_failed';
  end if;
  select c.user_id into owner
  from public.messages m join public.chats c on c.id = m.chat_id where m.id = p_request_id;
  insert into image_queue.jobs (request_id, chat_id, user_id, lane_seq)
  select m.id, m.chat_id, owner,
         coalesce((select j.lane_seq from image_queue.jobs j where j.state = 'queued'
                   order by j.lane_seq, j.created_at limit 1), 0)
  from public.messages m where m.id = p_request_id;
  perform pg_notify('image_requests', p_request_id::text);
  return 'retried';
end
$$;

-- How many queued requests the fair order claims before this one: those ahead of it in lane
-- order (one range of the queued-lane index: cheap at any depth that matters to a user).
-- Null once it is no longer queued. The owner only: anyone else, and a request that does not
-- exist, get the same "not found".
create function public.image_request_position(request_id uuid)
returns integer
language plpgsql stable
security definer
set search_path = ''
as $$
declare
  mine image_queue.jobs;
  ahead integer;
begin
  if not exists (
    select 1 from public.messages m join public.chats c on c.id = m.chat_id
    where m.id = image_request_position.request_id and c.user_id = auth.uid()
  ) then
    raise exception 'request % not found', image_request_position.request_id
      using errcode = 'no_data_found';
  end if;
  select * into mine from image_queue.jobs j where j.request_id = image_request_position.request_id;
  if not found or mine.state <> 'queued' then
    return null;
  end if;
  select count(*) into ahead from image_queue.jobs j
  where j.state = 'queued' and (j.lane_seq, j.created_at) < (mine.lane_seq, mine.created_at);
  return ahead;
end
$$;

revoke all on function public.image_request_position(uuid) from public, anon, service_role;
grant execute on function public.image_request_position(uuid) to authenticated;
revoke all on function image_queue.queued_content() from public, anon, authenticated;
revoke all on function image_queue.reply_queued(uuid[]) from public, anon, authenticated;

-- Requests queued under the old rule (no reply until claimed) get their queued reply now.
insert into public.messages (chat_id, role, content, message_type, status, reply_to)
select j.chat_id, 'assistant', image_queue.queued_content(), 'image', 'queued', j.request_id
from image_queue.jobs j
where j.state in ('queued', 'waiting')
on conflict (reply_to) where reply_to is not null do nothing;
