-- A message for a chat that is missing, not given, or someone else's was refused by row-level
-- security with "new row violates row-level security policy" (HTTP 403 through PostgREST),
-- which names no problem. This trigger runs before that check, for callers subject to RLS
-- (the signed-in frontend), and refuses with a message that does: "chat_id is required", or
-- "chat <id> not found" (HTTP 400). A chat of another user is looked up under RLS, where it is
-- as invisible as one that does not exist, so both get the same answer and nobody learns
-- whether someone else's chat id exists. The service role and the queue's own functions
-- bypass RLS and skip the lookup (the foreign key still guards them).

create function public.messages_require_own_chat() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if not row_security_active('public.messages') then
    return new;
  end if;
  if new.chat_id is null then
    raise exception 'chat_id is required: the id of the chat the message belongs to'
      using errcode = 'not_null_violation';
  end if;
  -- Invoker rights: RLS on chats shows the caller their own chats only.
  if not exists (select 1 from public.chats c where c.id = new.chat_id) then
    raise exception 'chat % not found', new.chat_id
      using errcode = 'check_violation',
            hint = 'chat_id must be the id of one of the signed-in user''s chats.';
  end if;
  return new;
end
$$;

revoke all on function public.messages_require_own_chat() from public, anon, authenticated;

-- Named to sort before messages_validate: triggers of one event fire in name order, so the
-- missing chat is reported before any complaint about the message itself.
create trigger messages_require_own_chat
  before insert on public.messages
  for each row execute function public.messages_require_own_chat();
