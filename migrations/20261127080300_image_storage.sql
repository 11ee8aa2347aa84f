-- Where Supabase Storage exists (schema storage with buckets and objects), a private bucket for
-- generated images and a policy letting a chat's owner read them: objects live at
-- <user_id>/<chat_id>/<request_id>.<ext>. On a plain PostgreSQL there is no storage schema and
-- this migration does nothing (the listener then stores images in a local directory).
-- The listener writes with the service role, which bypasses RLS; nobody else may write.

do $$
begin
  if to_regclass('storage.buckets') is null or to_regclass('storage.objects') is null then
    raise notice 'no Supabase Storage schema: the generated-images bucket is not created';
    return;
  end if;

  insert into storage.buckets (id, name, public)
  values ('generated-images', 'generated-images', false)
  on conflict (id) do nothing;

  if not exists (
    select 1 from pg_policies
    where schemaname = 'storage' and tablename = 'objects'
      and policyname = 'image-listener: chat owners read their images'
  ) then
    -- Compared as text: a malformed object name must not make the policy raise a cast error.
    execute $policy$
      create policy "image-listener: chat owners read their images" on storage.objects
        for select to authenticated
        using (
          bucket_id = 'generated-images'
          and (storage.foldername(name))[1] = (select auth.uid())::text
          and (storage.foldername(name))[2] in (
            select c.id::text from public.chats c where c.user_id = (select auth.uid())
          )
        )
    $policy$;
  end if;
end
$$;
