-- Edits: an image request may start from the image of a complete reply in the same chat
-- (`edit_of`), from up to 16 images the user uploaded (`references`, object paths in the
-- user's own folder of the input store), with a PNG `mask` for the first input image and an
-- `input_fidelity`. The options are validated here at insert, like the others (the function
-- is the one of 20261205140000 with these checks added; core/validation.py holds the same
-- rules). The listener carries them out with images.edit.
--
-- The input store: in the Supabase modes a private Storage bucket `image-inputs`, where a
-- signed-in user may upload to, read, replace and delete objects of their own folder only
-- (<user_id>/...); in the postgres mode a directory (IMAGE_LISTENER_INPUT_DIR) with the same
-- layout. public.image_reply_image(reply) tells the service role where a reply's image is.

create or replace function public.messages_validate() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  prompt_length integer;
  allowed_keys constant text[] := array['size', 'quality', 'background', 'output_format',
    'partial_images', 'edit_of', 'references', 'mask', 'input_fidelity'];
  extra_keys text[];
  opt_value jsonb;
  width integer;
  height integer;
  owner_id uuid;
  source record;
  input record;
  path text;
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
      raise exception 'unknown image option(s): %; allowed: size, quality, background, output_format, partial_images, edit_of, references, mask, input_fidelity',
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

    -- Edits (migrations/20261205150000_edits.sql): the image of a complete reply in this chat,
    -- the user's own uploads, a mask, the fidelity. core/validation.py holds the same rules.
    opt_value := new.options -> 'edit_of';
    if opt_value is not null then
      if jsonb_typeof(opt_value) <> 'string' or (opt_value #>> '{}') !~*
         '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        raise exception 'option edit_of must be the id of a complete image reply in this chat'
          using errcode = 'check_violation';
      end if;
      -- Invoker rights: a signed-in user sees only their own chats' messages, so another
      -- user's reply and one in another chat of their own get the same answer.
      select m.role, m.message_type, m.status into source from public.messages m
      where m.id = (opt_value #>> '{}')::uuid and m.chat_id = new.chat_id;
      if not found or source.role <> 'assistant' then
        raise exception 'option edit_of: there is no image reply % in this chat', opt_value #>> '{}'
          using errcode = 'check_violation';
      end if;
      if source.message_type <> 'image' then
        raise exception 'option edit_of: message % is not an image reply', opt_value #>> '{}'
          using errcode = 'check_violation';
      end if;
      if source.status is distinct from 'complete' then
        raise exception 'option edit_of: image reply % is not complete (it is %)',
          opt_value #>> '{}', coalesce(source.status, 'without a status')
          using errcode = 'check_violation';
      end if;
    end if;

    opt_value := new.options -> 'references';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'array'
       or jsonb_array_length(opt_value) not between 1 and 16) then
      raise exception 'option references must be an array of 1 to 16 object paths'
        using errcode = 'check_violation';
    end if;
    if new.options ? 'mask' and not (new.options ? 'edit_of' or new.options ? 'references') then
      raise exception 'option mask needs edit_of or references: it applies to the first input image'
        using errcode = 'check_violation';
    end if;
    if new.options ? 'input_fidelity'
       and not (new.options ? 'edit_of' or new.options ? 'references') then
      raise exception 'option input_fidelity needs edit_of or references: it is about input images'
        using errcode = 'check_violation';
    end if;
    if new.options ? 'references' or new.options ? 'mask' then
      select c.user_id into owner_id from public.chats c where c.id = new.chat_id;
      for input in
        select 'references' as option, r.value, array['png', 'jpg', 'jpeg', 'webp'] as extensions
        from jsonb_array_elements(coalesce(new.options -> 'references', '[]'::jsonb)) r
        union all
        select 'mask', new.options -> 'mask', array['png'] where new.options ? 'mask'
      loop
        if jsonb_typeof(input.value) <> 'string' then
          raise exception 'option %: each object path must be a string', input.option
            using errcode = 'check_violation';
        end if;
        path := input.value #>> '{}';
        -- <the user's id>/<name>: no other folder, no "..", no absolute path, no backslash,
        -- no empty or control characters
        if left(path, 37) <> owner_id::text || '/' or char_length(path) > 1024
           or path ~ '(^|/)\.\.(/|$)' or path ~ '//' or path ~ '[\\[:cntrl:]]'
           or char_length(path) = 37 then
          raise exception 'option %: % is not an object path in your own folder (<your user id>/<name>)',
            input.option, quote_literal(left(path, 120))
            using errcode = 'check_violation';
        end if;
        if not coalesce(lower(substring(path from '\.([^./]+)$')) = any (input.extensions), false)
        then
          raise exception 'option %: % must end in .%', input.option,
            quote_literal(left(path, 120)), array_to_string(input.extensions, ', .')
            using errcode = 'check_violation';
        end if;
      end loop;
    end if;

    opt_value := new.options -> 'input_fidelity';
    if opt_value is not null and (jsonb_typeof(opt_value) <> 'string'
       or opt_value #>> '{}' not in ('low', 'high')) then
      raise exception 'option input_fidelity must be low or high'
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

-- Where a complete image reply's image is stored (the listener loads it for edit_of): its
-- metadata.storage (bucket, location), or null when the reply is gone or not a complete image.
create function public.image_reply_image(p_reply_id uuid)
returns jsonb
language sql stable
security definer
set search_path = ''
as $$
  select m.metadata -> 'storage'
  from public.messages m
  where m.id = p_reply_id and m.role = 'assistant' and m.message_type = 'image'
    and m.status = 'complete'
$$;

revoke all on function public.image_reply_image(uuid) from public, anon, authenticated;
grant execute on function public.image_reply_image(uuid) to service_role;

do $$
begin
  if to_regclass('storage.buckets') is null or to_regclass('storage.objects') is null then
    raise notice 'no Supabase Storage schema: the image-inputs bucket is not created';
    return;
  end if;

  insert into storage.buckets (id, name, public)
  values ('image-inputs', 'image-inputs', false)
  on conflict (id) do nothing;

  if not exists (
    select 1 from pg_policies
    where schemaname = 'storage' and tablename = 'objects'
      and policyname = 'image-listener: users manage their own inputs'
  ) then
    -- Compared as text: a malformed object name must not make the policy raise a cast error.
    execute $policy$
      create policy "image-listener: users manage their own inputs" on storage.objects
        for all to authenticated
        using (
          bucket_id = 'image-inputs'
          and (storage.foldername(name))[1] = (select auth.uid())::text
        )
        with check (
          bucket_id = 'image-inputs'
          and (storage.foldername(name))[1] = (select auth.uid())::text
        )
    $policy$;
  end if;
end
$$;
