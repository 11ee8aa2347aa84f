-- Previews: up to three partial images while a request generates. A new request option
-- `partial_images` (a whole number 0..3, validated here like the others; the listener's
-- IMAGE_LISTENER_PARTIAL_IMAGES applies when a request does not give it), a reply column
-- `preview_url` that the lease holder sets for each partial image through a fenced function,
-- and a trigger that clears it whenever the reply leaves 'generating' (complete, failed, or
-- back to queued), so that no stale preview outlives its generation. The same trigger stamps
-- `metadata.started_at` when the reply becomes 'generating' (the claim's time: since the reply
-- exists from the insert, its created_at no longer says when work began).

alter table public.messages add column preview_url text;

-- The insert policy now also refuses a user row that names a preview (as it does image_url).
drop policy messages_owner_insert on public.messages;
create policy messages_owner_insert on public.messages
  for insert to authenticated with check (
    public.is_chat_owner(chat_id)
    and role = 'user'
    and image_url is null
    and preview_url is null
    and status is null
    and error is null
    and reply_to is null
    and metadata = '{}'::jsonb
  );

-- The validation of 20261127080100, with partial_images among the options (core/validation.py
-- holds the same rules: change both together).
create or replace function public.messages_validate() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  prompt_length integer;
  allowed_keys constant text[] :=
    array['size', 'quality', 'background', 'output_format', 'partial_images'];
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
      raise exception 'unknown image option(s): %; allowed: size, quality, background, output_format, partial_images',
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

    opt_value := new.options -> 'partial_images';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'number'
       or opt_value::numeric not in (0, 1, 2, 3)) then
      raise exception 'option partial_images must be a whole number from 0 to 3'
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

create function public.messages_status_changed() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.status is distinct from 'generating' then
    new.preview_url := null;
  elsif old.status is distinct from 'generating' then
    new.metadata := new.metadata || jsonb_build_object('started_at', now());
  end if;
  return new;
end
$$;

revoke all on function public.messages_status_changed() from public, anon, authenticated;

create trigger messages_status_changed
  before update of status, preview_url on public.messages
  for each row execute function public.messages_status_changed();

-- A partial image of a running request: only the lease holder's write lands. Returns
-- 'previewed', or 'lease_lost' / 'cancelled' (the listener stops the stream then).
create function public.image_jobs_preview(
  p_request_id uuid,
  p_worker text,
  p_attempt integer,
  p_preview_url text,
  p_index integer
)
returns text
language plpgsql
security definer
set search_path = ''
as $$
begin
  perform 1 from image_queue.jobs j
  where j.request_id = p_request_id and j.state = 'running'
    and j.lease_holder = p_worker and j.attempts = p_attempt
  for share;
  if not found then
    return image_queue.lost_reason(p_request_id);
  end if;
  update public.messages m
  set preview_url = p_preview_url,
      metadata = m.metadata || jsonb_build_object('preview_index', p_index)
  where m.reply_to = p_request_id and m.status = 'generating';
  return 'previewed';
end
$$;

revoke all on function public.image_jobs_preview(uuid, text, integer, text, integer)
  from public, anon, authenticated;
grant execute on function public.image_jobs_preview(uuid, text, integer, text, integer)
  to service_role;
