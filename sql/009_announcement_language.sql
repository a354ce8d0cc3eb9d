-- The language of a pool number's announcements (NULL: the bridge's default,
-- MB_DEFAULT_LANGUAGE): callers of a Russian number hear Russian prompts.
ALTER TABLE pool_numbers ADD COLUMN language text CHECK (language IN ('en', 'ru'));
