-- A campaign is expanded in chunks of its enterprise's registrations, in
-- user id order, each chunk its own short transaction, so a large campaign
-- never holds the writer for long (a 1M campaign's one transaction held it
-- ~2 s, and every accept and lease renewal waited). While a message is
-- still `accepted`, `expand_cursor` is the last user id of the chunks
-- already planned (NULL: none yet) and `expand_matched` the people they
-- matched (both unused once it is expanded); `matched` stays NULL until
-- the last chunk, as before.
ALTER TABLE messages ADD COLUMN expand_cursor TEXT;
ALTER TABLE messages ADD COLUMN expand_matched BIGINT NOT NULL DEFAULT 0;
