-- Operator functions behind `image-listener status | retry | cancel | requeue-stuck`, so that
-- fixing stuck or failed work never needs hand-written SQL. Service role (and owner) only.

-- A snapshot of the queue as one JSON document (cheap: counts come from partial indexes).
create function public.image_queue_status(p_failures integer default 10)
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select jsonb_build_object(
    'now', now(),
    'jobs', (
      select jsonb_build_object(
        'queued', count(*) filter (where j.state = 'queued'),
        'waiting', count(*) filter (where j.state = 'waiting'),
        'running', count(*) filter (where j.state = 'running'),
        'expired_leases', count(*) filter (where j.state = 'running' and j.lease_expires_at <= now())
      )
      from image_queue.jobs j
    ),
    'oldest_queued_seconds', (
      select extract(epoch from now() - min(j.created_at))
      from image_queue.jobs j where j.state in ('queued', 'waiting')
    ),
    'leases', coalesce((
      select jsonb_agg(l order by l.worker)
      from (
        select j.lease_holder as worker, count(*) as jobs,
               min(j.lease_expires_at) as earliest_expiry
        from image_queue.jobs j where j.state = 'running'
        group by j.lease_holder
      ) l
    ), '[]'::jsonb),
    'recent_failures', coalesce((
      select jsonb_agg(f order by f.failed_at desc)
      from (
        select m.reply_to as request_id, m.error, m.metadata ->> 'error_code' as error_code,
               m.updated_at as failed_at
        from public.messages m
        where m.role = 'assistant' and m.status = 'failed' and m.reply_to is not null
        order by m.updated_at desc
        limit greatest(p_failures, 0)
      ) f
    ), '[]'::jsonb)
  )
$$;

-- Try a failed request again: a fresh job (attempts from zero) and the same reply row back to
-- 'generating'. Only requests whose reply is 'failed' and that have no job qualify, so a
-- retry can never create a second reply or run next to an attempt in progress.
create function public.image_jobs_retry(p_request_id uuid)
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
  set status = 'generating', error = null, image_url = null, content = 'Generating image...',
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

-- Every request that failed since p_since, retried; returns how many.
create function public.image_jobs_retry_failed(p_since timestamptz)
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  request uuid;
  retried integer := 0;
begin
  for request in
    select m.reply_to from public.messages m
    where m.role = 'assistant' and m.status = 'failed' and m.updated_at >= p_since
      and m.reply_to is not null
    order by m.updated_at
  loop
    if public.image_jobs_retry(request) = 'retried' then
      retried := retried + 1;
    end if;
  end loop;
  return retried;
end
$$;

-- An operator stops a request: its job goes, the reply ends 'failed' with a plain reason. A
-- worker still generating it finds its lease gone and writes nothing.
create function public.image_jobs_cancel(p_request_id uuid, p_reason text default null)
returns text
language plpgsql
security definer
set search_path = ''
as $$
declare
  job image_queue.jobs;
  reason text := coalesce(nullif(p_reason, ''), 'The request was cancelled by an operator.');
begin
  delete from image_queue.jobs j where j.request_id = p_request_id returning j.* into job;
  if not found then
    return case
      when exists (select 1 from public.messages m where m.id = p_request_id) then 'not_queued'
      else 'not_found'
    end;
  end if;
  insert into public.messages as m
    (chat_id, role, content, message_type, status, error, reply_to, metadata)
  values (job.chat_id, 'assistant', 'The image could not be generated. ' || reason, 'image',
          'failed', reason, p_request_id, jsonb_build_object('error_code', 'cancelled'))
  on conflict (reply_to) where reply_to is not null do update
    set status = 'failed', error = excluded.error, content = excluded.content,
        image_url = null, metadata = (m.metadata - 'retry_at') || excluded.metadata;
  return 'cancelled';
end
$$;

-- Hand every job whose lease has expired back to the queue now (claims would take them over
-- anyway; this makes it immediate and visible). The attempt that died stays counted.
create function public.image_jobs_requeue_stuck()
returns integer
language plpgsql
security definer
set search_path = ''
as $$
declare
  moved integer;
begin
  update image_queue.jobs j
  set state = 'queued', crashes = j.crashes + 1, lease_holder = null, lease_expires_at = null,
      updated_at = now()
  where j.state = 'running' and j.lease_expires_at <= now();
  get diagnostics moved = row_count;
  if moved > 0 then
    perform pg_notify('image_requests', '');
  end if;
  return moved;
end
$$;

do $$
declare
  fn text;
begin
  foreach fn in array array[
    'public.image_queue_status(integer)',
    'public.image_jobs_retry(uuid)',
    'public.image_jobs_retry_failed(timestamptz)',
    'public.image_jobs_cancel(uuid, text)',
    'public.image_jobs_requeue_stuck()'
  ] loop
    execute format('revoke all on function %s from public, anon, authenticated', fn);
    execute format('grant execute on function %s to service_role', fn);
  end loop;
end
$$;
